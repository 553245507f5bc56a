//! How the agent logs.

/// Whether log lines carry ANSI colour codes: only on a terminal, and not when `NO_COLOR` is
/// set to a non-empty value (<https://no-color.org>). An agent's stderr redirected to a log
/// file (as `infermesh local` does) or to a pipe gets plain text.
pub fn use_colour(is_terminal: bool, no_color: Option<&str>) -> bool {
    is_terminal && no_color.is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::use_colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None), "a file or a pipe gets no colour");
        assert!(!use_colour(true, Some("1")));
        assert!(!use_colour(false, Some("1")));
        // no-color.org: an empty NO_COLOR does not count as set.
        assert!(use_colour(true, Some("")));
        assert!(!use_colour(false, Some("")));
    }
}
