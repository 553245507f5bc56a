#!/usr/bin/env python3
"""Generate the synthetic JSONL text corpus used by the infermesh quickstart and tests.

Why this exists: infermesh needs a realistic-looking batch of documents to embed, with
varied sentence lengths (5 to 40 words) so that length-sorted batching actually matters,
but the repository must not ship text copied from third-party data sets. This script makes
every sentence itself from hard-coded word lists and templates, driven by
``random.Random(seed)``, so the output is byte-for-byte reproducible for a given
``--records``/``--seed`` and carries no external licence.

Each output line is ``{"id": "doc-00000", "text": "..."}``. For negative tests it can also
corrupt exactly one line: ``--bad-line K`` writes the literal text ``this is not json`` as
line K, and ``--missing-field K`` writes line K as ``{"id": ..., "body": ...}`` with no
``text`` field. Line numbers are 1-based. All other lines are identical to the output
without those flags, because the random stream is consumed the same way for every line.

Example:
    python scripts/gen_corpus.py                      # examples/quickstart/corpus.jsonl
    python scripts/gen_corpus.py --out /tmp/c.jsonl --records 100 --seed 1 --bad-line 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

# Each topic: subjects (noun phrases without article), verbs (past tense, transitive),
# objects (noun phrases without article), places/times (prepositional phrases).
TOPICS = {
    "gpu clusters": {
        "subjects": ["engineer", "scheduler", "operator", "gpu cluster", "training job",
                     "data center", "research team", "inference server", "node"],
        "verbs": ["restarted", "scaled", "monitored", "drained", "upgraded", "measured",
                  "rebooted", "profiled", "balanced"],
        "objects": ["gpu nodes", "batch queue", "memory usage", "model weights",
                    "network cables", "cooling fans", "inference requests", "tensor cores",
                    "job logs"],
        "places": ["in the data center", "during the night shift", "after the upgrade",
                   "before the deadline", "across three racks", "under heavy load"],
    },
    "cooking": {
        "subjects": ["chef", "baker", "cook", "family", "student", "grandmother",
                     "restaurant", "kitchen team"],
        "verbs": ["baked", "stirred", "tasted", "chopped", "roasted", "seasoned", "served",
                  "burned", "boiled"],
        "objects": ["bread", "tomato soup", "onions", "fresh pasta", "garlic",
                    "chocolate cake", "rice", "vegetables", "lemon sauce"],
        "places": ["in the small kitchen", "for the dinner party", "on a cold evening",
                   "before the guests arrived", "with too much salt", "over a low flame"],
    },
    "weather": {
        "subjects": ["storm", "wind", "forecast", "rain", "sun", "fog", "meteorologist",
                     "cold front", "snow"],
        "verbs": ["covered", "flooded", "predicted", "warmed", "cooled", "reached",
                  "delayed", "cleared", "soaked"],
        "objects": ["the coast", "the valley", "mountain roads", "the harbor",
                    "morning trains", "the city", "farm fields", "the airport"],
        "places": ["by noon", "for two days", "early in the morning", "along the coast",
                   "late last night", "without any warning"],
    },
    "sports": {
        "subjects": ["team", "coach", "goalkeeper", "runner", "captain", "referee",
                     "young player", "crowd", "swimmer"],
        "verbs": ["won", "lost", "trained", "watched", "cheered", "scored", "defended",
                  "practiced", "celebrated"],
        "objects": ["the final match", "a penalty", "the league title", "the long race",
                    "the new record", "the ball", "the second half", "the season"],
        "places": ["at the stadium", "in the rain", "on a sunny afternoon",
                   "after a long break", "in front of the fans", "during extra time"],
    },
    "astronomy": {
        "subjects": ["astronomer", "telescope", "comet", "satellite", "observatory",
                     "space probe", "student", "planet"],
        "verbs": ["observed", "photographed", "tracked", "discovered", "orbited",
                  "mapped", "measured", "studied", "detected"],
        "objects": ["distant galaxies", "the moon", "a bright star", "the red planet",
                    "a faint signal", "the solar eclipse", "ice rings", "dark clouds of dust"],
        "places": ["through the night", "from the mountain top", "above the desert",
                   "for many years", "with a new camera", "beyond the asteroid belt"],
    },
    "gardening": {
        "subjects": ["gardener", "neighbor", "farmer", "child", "volunteer", "old man"],
        "verbs": ["planted", "watered", "picked", "trimmed", "grew", "harvested",
                  "protected", "moved"],
        "objects": ["tomato plants", "roses", "apple trees", "the herbs", "young seeds",
                    "the hedge", "green beans", "sunflowers"],
        "places": ["in the spring", "behind the house", "after the rain",
                   "every weekend", "near the fence", "before the first frost"],
    },
    "music": {
        "subjects": ["band", "singer", "pianist", "orchestra", "drummer", "choir",
                     "composer", "music teacher"],
        "verbs": ["played", "recorded", "wrote", "rehearsed", "performed", "tuned",
                  "composed", "practiced"],
        "objects": ["a quiet song", "the new album", "an old piano", "the guitar",
                    "a long symphony", "the opening theme", "three encores"],
        "places": ["at the concert hall", "in a tiny studio", "for the festival",
                   "late into the night", "on the radio", "in front of a huge crowd"],
    },
    "travel": {
        "subjects": ["traveler", "pilot", "tour guide", "family", "train", "ferry",
                     "hiker", "driver"],
        "verbs": ["visited", "crossed", "explored", "booked", "missed", "reached",
                  "followed", "photographed"],
        "objects": ["the old bridge", "a mountain village", "the night train",
                    "the museum", "a narrow road", "the border", "the island"],
        "places": ["in the summer", "after a long flight", "without a map",
                   "on the last day", "through the forest", "along the river"],
    },
    "databases": {
        "subjects": ["database", "developer", "query planner", "backup job", "replica",
                     "administrator", "migration script"],
        "verbs": ["indexed", "stored", "replicated", "locked", "updated", "deleted",
                  "compressed", "restored"],
        "objects": ["the table", "old records", "customer rows", "the schema",
                    "a large index", "the transaction log", "every snapshot"],
        "places": ["in a single transaction", "during the migration", "at midnight",
                   "without downtime", "after the crash", "on the primary server"],
    },
}

ADJECTIVES = ["old", "young", "tired", "busy", "careful", "quiet", "famous", "small",
              "large", "new", "patient", "clever", "curious", "happy", "nervous", "local",
              "experienced", "brave", "calm", "early"]

ADVERBS = ["quickly", "slowly", "carefully", "finally", "suddenly", "quietly", "again",
           "easily", "proudly", "barely"]

CONNECTORS = ["and then", "while", "because", "although", "after", "before", "so", "but",
              "even though", "until"]

COMMENTS = [
    "nobody expected that",
    "everyone was surprised",
    "it took longer than planned",
    "the results were good",
    "the weather made it harder",
    "it happened again the next week",
    "people talked about it for days",
    "the report was written later",
    "it was a long day",
    "the numbers looked strange",
]

# Target length buckets (min words, max words, weight): mostly short, a long tail.
LENGTH_BUCKETS = [(5, 10, 45), (11, 22, 35), (23, 40, 20)]
MIN_WORDS, MAX_WORDS = 5, 40


def _clause(rng: random.Random, topic: dict, adjective: bool) -> list[str]:
    """One 'the [adj] SUBJECT [adv] VERB the OBJECT [PLACE]' clause as words."""
    words = ["the"]
    if adjective:
        words.append(rng.choice(ADJECTIVES))
    words += rng.choice(topic["subjects"]).split()
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    words.append(rng.choice(topic["verbs"]))
    obj = rng.choice(topic["objects"]).split()
    if obj[0] not in ("the", "a", "an", "every", "three"):
        obj = ["the"] + obj
    words += obj
    return words


def make_sentence(rng: random.Random) -> str:
    """Build one sentence with a word count in [MIN_WORDS, MAX_WORDS]."""
    lo, hi, _ = rng.choices(LENGTH_BUCKETS, weights=[b[2] for b in LENGTH_BUCKETS])[0]
    target = rng.randint(lo, hi)
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    # The base clause is 5 words without an adjective ("the chef burned the soup"), more with.
    words = _clause(rng, topic, adjective=target >= 7)
    pieces = [words]
    count = len(words)
    used_places: set[str] = set()
    # Add place phrases, further clauses and comments until the target is reached.
    for _ in range(12):
        if count >= target:
            break
        kind = rng.random()
        if kind < 0.35:
            place = rng.choice(topic["places"])
            if place in used_places:
                continue
            used_places.add(place)
            extra = place.split()
        elif kind < 0.8:
            other = TOPICS[rng.choice(sorted(TOPICS))] if rng.random() < 0.3 else topic
            extra = [","] + rng.choice(CONNECTORS).split() + _clause(
                rng, other, adjective=rng.random() < 0.5)
        else:
            extra = [","] + rng.choice(["and", "but", "so"]).split() + rng.choice(COMMENTS).split()
        n_extra = sum(1 for w in extra if w != ",")
        if count + n_extra > MAX_WORDS:
            break
        pieces.append(extra)
        count += n_extra
    text = " ".join(w for p in pieces for w in p).replace(" ,", ",")
    text = text[0].upper() + text[1:]
    end = "?" if rng.random() < 0.05 else ("!" if rng.random() < 0.03 else ".")
    return text + end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples/quickstart/corpus.jsonl",
                   help="output JSONL path (default: %(default)s)")
    p.add_argument("--records", type=int, default=4000,
                   help="number of lines to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    p.add_argument("--bad-line", type=int, metavar="K",
                   help="replace line K (1-based) with the literal text 'this is not json'")
    p.add_argument("--missing-field", type=int, metavar="K",
                   help='write line K (1-based) as {"id": ..., "body": ...} with no "text"')
    args = p.parse_args(argv)

    if args.records < 0:
        p.error("--records must be >= 0")
    for name in ("bad_line", "missing_field"):
        k = getattr(args, name)
        if k is not None and not 1 <= k <= args.records:
            p.error(f"--{name.replace('_', '-')} must be between 1 and --records ({args.records})")
    if args.bad_line is not None and args.bad_line == args.missing_field:
        p.error("--bad-line and --missing-field must name different lines")

    rng = random.Random(args.seed)
    lines = []
    for i in range(args.records):
        doc_id = f"doc-{i:05d}"
        text = make_sentence(rng)  # always drawn, so flags never shift other lines
        n = i + 1
        if n == args.bad_line:
            lines.append("this is not json")
        elif n == args.missing_field:
            lines.append(json.dumps({"id": doc_id, "body": text}))
        else:
            lines.append(json.dumps({"id": doc_id, "text": text}))

    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
