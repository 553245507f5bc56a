//! The Pod Security Standards' "restricted" profile (what `pod-security.kubernetes.io/enforce:
//! restricted` admits, as of Kubernetes 1.33), plus this project's own rule that every
//! container's root filesystem is read-only.

use k8s_openapi::api::core::v1::{PodSpec, SecurityContext};

/// Volume types the restricted profile allows.
const ALLOWED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Sysctls the baseline profile allows.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// SELinux types the baseline profile allows.
const SELINUX_TYPES: &[&str] = &["", "container_t", "container_init_t", "container_kvm_t"];

/// What in `spec` breaks the restricted profile (or leaves a root filesystem writable), one
/// line each naming the container; empty when it complies.
pub fn restricted_violations(spec: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    let pod = spec.security_context.clone().unwrap_or_default();

    // Host namespaces and ports.
    for (field, set) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if set == Some(true) {
            out.push(format!("pod: {field} is true"));
        }
    }

    // Volumes.
    for v in spec.volumes.iter().flatten() {
        let value = serde_json::to_value(v).unwrap_or_default();
        let kinds: Vec<&String> = value
            .as_object()
            .map(|m| m.keys().filter(|k| *k != "name").collect())
            .unwrap_or_default();
        for k in kinds {
            if !ALLOWED_VOLUMES.contains(&k.as_str()) {
                out.push(format!("volume {}: type {k} is not allowed", v.name));
            }
        }
    }

    // Pod-level settings.
    if pod.run_as_user == Some(0) {
        out.push("pod: runAsUser is 0".into());
    }
    for s in pod.sysctls.iter().flatten() {
        if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
            out.push(format!("pod: sysctl {} is not allowed", s.name));
        }
    }
    if let Some(se) = &pod.se_linux_options {
        if !SELINUX_TYPES.contains(&se.type_.as_deref().unwrap_or("")) {
            out.push("pod: seLinuxOptions.type is not allowed".into());
        }
        if se.user.is_some() || se.role.is_some() {
            out.push("pod: seLinuxOptions user/role must be unset".into());
        }
    }
    if pod
        .app_armor_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        out.push("pod: appArmorProfile is Unconfined".into());
    }
    let pod_seccomp_ok = seccomp_ok(pod.seccomp_profile.as_ref().map(|s| s.type_.as_str()));
    if pod.seccomp_profile.is_some() && !pod_seccomp_ok {
        out.push("pod: seccompProfile must be RuntimeDefault or Localhost".into());
    }
    let pod_non_root = pod.run_as_non_root == Some(true);

    let containers = spec
        .containers
        .iter()
        .map(|c| (&c.name, &c.security_context, &c.ports))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| (&c.name, &c.security_context, &c.ports)),
        );
    for (name, sc, ports) in containers {
        let sc = sc.clone().unwrap_or_default();
        out.extend(
            container_violations(&sc, pod_non_root, pod_seccomp_ok)
                .into_iter()
                .map(|v| format!("container {name}: {v}")),
        );
        for p in ports.iter().flatten() {
            if p.host_port.is_some_and(|h| h != 0) {
                out.push(format!("container {name}: hostPort is set"));
            }
        }
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        let sc = c.security_context.clone().unwrap_or_default();
        out.extend(
            container_violations(&sc, pod_non_root, pod_seccomp_ok)
                .into_iter()
                .map(|v| format!("ephemeral container {}: {v}", c.name)),
        );
    }
    out
}

fn seccomp_ok(kind: Option<&str>) -> bool {
    matches!(kind, Some("RuntimeDefault" | "Localhost"))
}

fn container_violations(
    sc: &SecurityContext,
    pod_non_root: bool,
    pod_seccomp: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if sc.privileged == Some(true) {
        out.push("privileged".to_string());
    }
    if sc.allow_privilege_escalation != Some(false) {
        out.push("allowPrivilegeEscalation must be false".into());
    }
    match sc.run_as_non_root {
        Some(false) => out.push("runAsNonRoot is false".into()),
        None if !pod_non_root => out.push("runAsNonRoot must be true (pod or container)".into()),
        _ => {}
    }
    if sc.run_as_user == Some(0) {
        out.push("runAsUser is 0".into());
    }
    match sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()) {
        None if !pod_seccomp => {
            out.push("seccompProfile must be RuntimeDefault or Localhost (pod or container)".into())
        }
        Some(t) if !seccomp_ok(Some(t)) => out.push(format!("seccompProfile is {t}")),
        _ => {}
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|c| c == "ALL") {
        out.push("capabilities must drop ALL".into());
    }
    for add in caps.add.iter().flatten() {
        if add != "NET_BIND_SERVICE" {
            out.push(format!("capability {add} added"));
        }
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        out.push("procMount is not Default".into());
    }
    if let Some(se) = &sc.se_linux_options {
        if !SELINUX_TYPES.contains(&se.type_.as_deref().unwrap_or("")) {
            out.push("seLinuxOptions.type is not allowed".into());
        }
        if se.user.is_some() || se.role.is_some() {
            out.push("seLinuxOptions user/role must be unset".into());
        }
    }
    if sc
        .app_armor_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        out.push("appArmorProfile is Unconfined".into());
    }
    if sc
        .windows_options
        .as_ref()
        .is_some_and(|w| w.host_process == Some(true))
    {
        out.push("windowsOptions.hostProcess is true".into());
    }
    // This project's rule, beyond the profile.
    if sc.read_only_root_filesystem != Some(true) {
        out.push("readOnlyRootFilesystem must be true".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).expect("pod spec")
    }

    const GOOD: &str = r#"
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  seccompProfile: {type: RuntimeDefault}
containers:
  - name: c
    image: i
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {drop: [ALL]}
volumes:
  - name: tmp
    emptyDir: {}
"#;

    #[test]
    fn a_restricted_pod_passes() {
        assert_eq!(restricted_violations(&spec(GOOD)), Vec::<String>::new());
    }

    #[test]
    fn each_missing_setting_is_reported() {
        let cases = [
            ("runAsNonRoot: true", "runAsNonRoot: false", "runAsNonRoot"),
            ("runAsUser: 65532", "runAsUser: 0", "runAsUser is 0"),
            (
                "seccompProfile: {type: RuntimeDefault}",
                "seccompProfile: {type: Unconfined}",
                "seccompProfile",
            ),
            (
                "allowPrivilegeEscalation: false",
                "allowPrivilegeEscalation: true",
                "allowPrivilegeEscalation",
            ),
            (
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
                "readOnlyRootFilesystem",
            ),
            ("drop: [ALL]", "drop: [NET_RAW]", "drop ALL"),
            ("emptyDir: {}", "hostPath: {path: /}", "hostPath"),
            (
                "capabilities: {drop: [ALL]}",
                "capabilities: {drop: [ALL], add: [SYS_ADMIN]}",
                "SYS_ADMIN",
            ),
        ];
        for (from, to, expect) in cases {
            let bad = GOOD.replace(from, to);
            assert_ne!(bad, GOOD, "{from}");
            let v = restricted_violations(&spec(&bad));
            assert!(v.iter().any(|m| m.contains(expect)), "{to}: {v:?}");
        }
    }

    #[test]
    fn host_namespaces_and_ports_are_reported() {
        let bad = format!("hostNetwork: true\n{GOOD}").replace(
            "    image: i\n",
            "    image: i\n    ports: [{containerPort: 80, hostPort: 80}]\n",
        );
        let v = restricted_violations(&spec(&bad));
        assert!(v.iter().any(|m| m.contains("hostNetwork")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("hostPort")), "{v:?}");
    }
}
