//! The certificate of the gRPC port. The operator provisions a CA and a server certificate
//! into a Secret (`tls.crt`, `tls.key`, `ca.crt`) when none exists, or uses the one the user
//! supplies; agents trust `ca.crt`, mounted from the same Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// PEM material of the gRPC port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// Server certificate.
    pub cert: String,
    /// Server private key.
    pub key: String,
    /// The CA agents trust.
    pub ca: String,
}

/// Why the certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating failed.
    #[error("failed to generate the gRPC certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The API refused.
    #[error("failed to read or create Secret {name}: {source}")]
    Secret {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret does not exist and provisioning is off.
    #[error(
        "Secret {name} does not exist: create it (keys tls.crt, tls.key, ca.crt) or let the operator provision it"
    )]
    NotProvisioned {
        /// Secret name.
        name: String,
    },
    /// The Secret lacks a key.
    #[error("Secret {name} has no `{key}` (it needs tls.crt, tls.key and ca.crt)")]
    MissingKey {
        /// Secret name.
        name: String,
        /// The missing key.
        key: &'static str,
    },
}

/// The DNS names of the gRPC endpoint's host: for `svc.ns.svc`, also the short forms and
/// the `cluster.local` form.
pub fn subject_names(endpoint_host: &str) -> Vec<String> {
    let mut names = vec![endpoint_host.to_string()];
    let parts: Vec<&str> = endpoint_host.split('.').collect();
    if parts.len() >= 2 {
        names.push(parts[0].to_string());
        names.push(format!("{}.{}", parts[0], parts[1]));
        names.push(format!("{}.{}.svc", parts[0], parts[1]));
        names.push(format!("{}.{}.svc.cluster.local", parts[0], parts[1]));
    }
    names.sort();
    names.dedup();
    names
}

/// A new CA and a server certificate for `names`, both valid for ten years.
pub fn generate(names: &[String]) -> Result<Material, rcgen::Error> {
    // Valid from the start of last year (clock skew) for ten years.
    let year = k8s_openapi::jiff::Zoned::now().year() as i32;
    let now = (
        rcgen::date_time_ymd(year - 1, 1, 1),
        rcgen::date_time_ymd(year + 10, 1, 1),
    );
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "infermesh operator CA");
    ca_params.not_before = now.0;
    ca_params.not_after = now.1;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("infermesh"),
    );
    params.not_before = now.0;
    params.not_after = now.1;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Material {
        cert: cert.pem(),
        key: key.serialize_pem(),
        ca: ca_cert.pem(),
    })
}

fn key_of(secret: &Secret, name: &str, key: &'static str) -> Result<String, TlsError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| TlsError::MissingKey {
            name: name.into(),
            key,
        })
}

/// Reads Secret `name`; when it does not exist and `provision` is set, generates the
/// material and creates it (a replica that loses the race reads the winner's).
pub async fn ensure(
    api: &Api<Secret>,
    name: &str,
    names: &[String],
    provision: bool,
) -> Result<Material, TlsError> {
    let err = |source| TlsError::Secret {
        name: name.into(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(err)? {
        return Ok(Material {
            cert: key_of(&secret, name, "tls.crt")?,
            key: key_of(&secret, name, "tls.key")?,
            ca: key_of(&secret, name, "ca.crt")?,
        });
    }
    if !provision {
        return Err(TlsError::NotProvisioned { name: name.into() });
    }
    let material = generate(names)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "infermesh-operator".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(material.cert.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(material.key.clone().into_bytes()),
            ),
            (
                "ca.crt".to_string(),
                ByteString(material.ca.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %name, ?names, "provisioned the gRPC certificate");
            Ok(material)
        }
        Err(e) if super::is_conflict(&e) => Box::pin(ensure(api, name, names, false)).await,
        Err(e) => Err(err(e)),
    }
}

/// tonic's server TLS settings from the material.
pub fn server_config(m: &Material) -> tonic::transport::ServerTlsConfig {
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&m.cert, &m.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_names_cover_short_and_full_forms() {
        let names = subject_names("infermesh-grpc.infermesh.svc");
        assert!(names.contains(&"infermesh-grpc".to_string()));
        assert!(names.contains(&"infermesh-grpc.infermesh".to_string()));
        assert!(names.contains(&"infermesh-grpc.infermesh.svc".to_string()));
        assert!(names.contains(&"infermesh-grpc.infermesh.svc.cluster.local".to_string()));
    }

    #[test]
    fn generated_material_is_a_ca_and_a_server_certificate() {
        let m = generate(&subject_names("infermesh-grpc.infermesh.svc")).expect("generate");
        assert!(m.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key.contains("PRIVATE KEY"));
        assert_ne!(m.ca, m.cert);
    }
}
