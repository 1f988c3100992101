//! The credentials in a kubeconfig: the current context's user, with a client certificate
//! and key (as files or `-data`), or a bearer token (`token`, or `tokenFile`). Only these
//! fields are read; clusters are not (the agent asks the VIP's backends, not the server
//! the kubeconfig names). Files are read at each call, so rotated certificates (kubelet's
//! `kubelet-client-current.pem`) are picked up at the next connection.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::health::Identity;

/// What is wrong with a kubeconfig, naming its field as the YAML has it
/// (`users[0].user.client-key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct KubeconfigError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> KubeconfigError {
    KubeconfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// Who the agent is to the apiservers.
pub struct Credentials {
    /// The user's name in the kubeconfig (for messages).
    pub user: String,
    /// Client certificate and key.
    pub identity: Option<Identity>,
    /// Bearer token.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the key.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("client_certificate", &self.identity.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Option<Vec<NamedContext>>,
    #[serde(default)]
    users: Option<Vec<NamedUser>>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: Option<String>,
    context: Option<Context>,
}

#[derive(Deserialize)]
struct Context {
    user: Option<String>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: Option<String>,
    user: Option<User>,
}

#[derive(Deserialize)]
struct User {
    #[serde(rename = "client-certificate")]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<String>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    exec: Option<serde_norway::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_norway::Value>,
}

/// Reads the kubeconfig at `path` and the files it names.
pub fn load(path: &Path) -> Result<Credentials, KubeconfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err("(file)", e.to_string()))?;
    // kubectl resolves relative paths against the kubeconfig's directory.
    parse(&text, path.parent().unwrap_or(Path::new("/")))
}

/// Parses kubeconfig `text`; relative file names are relative to `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<Credentials, KubeconfigError> {
    let raw: Raw = serde_norway::from_str(text).map_err(|e| {
        // serde_norway names the position; its messages may span lines.
        err(
            "(yaml)",
            e.to_string().lines().collect::<Vec<_>>().join("; "),
        )
    })?;
    let current = raw
        .current_context
        .filter(|c| !c.is_empty())
        .ok_or_else(|| err("current-context", "not set"))?;
    let contexts = raw.contexts.unwrap_or_default();
    let (c, ctx) = contexts
        .iter()
        .enumerate()
        .find(|(_, c)| c.name.as_deref() == Some(current.as_str()))
        .ok_or_else(|| {
            err(
                "current-context",
                format!("{current:?}: no context of that name in contexts"),
            )
        })?;
    let user_name = ctx
        .context
        .as_ref()
        .and_then(|c| c.user.clone())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| err(format!("contexts[{c}].context.user"), "not set"))?;
    let users = raw.users.unwrap_or_default();
    let (u, named) = users
        .iter()
        .enumerate()
        .find(|(_, u)| u.name.as_deref() == Some(user_name.as_str()))
        .ok_or_else(|| {
            err(
                format!("contexts[{c}].context.user"),
                format!("{user_name:?}: no user of that name in users"),
            )
        })?;
    let at = |field: &str| format!("users[{u}].user.{field}");
    let user = named
        .user
        .as_ref()
        .ok_or_else(|| err(format!("users[{u}].user"), "not set"))?;
    let file = |name: &str| {
        let p = PathBuf::from(name);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    // The certificate and the key, each from a file or from -data (not both).
    let pem = |field: &str, path: &Option<String>, data: &Option<String>| match (path, data) {
        (Some(_), Some(_)) => Err(err(
            at(&format!("{field}-data")),
            format!("{field} is set too: use one of them"),
        )),
        (Some(p), None) => {
            let p = file(p);
            std::fs::read(&p)
                .map(Some)
                .map_err(|e| err(at(field), format!("{}: {e}", p.display())))
        }
        (None, Some(d)) => {
            let d: String = d.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(d)
                .map(Some)
                .map_err(|e| err(at(&format!("{field}-data")), format!("not base64: {e}")))
        }
        (None, None) => Ok(None),
    };
    let cert = pem(
        "client-certificate",
        &user.client_certificate,
        &user.client_certificate_data,
    )?;
    let key = pem("client-key", &user.client_key, &user.client_key_data)?;
    let field_of = |field: &str, data: &Option<String>| {
        if data.is_some() {
            at(&format!("{field}-data"))
        } else {
            at(field)
        }
    };
    let identity = match (cert, key) {
        (None, None) => None,
        (Some(_), None) => return Err(err(at("client-key"), "required with client-certificate")),
        (None, Some(_)) => return Err(err(at("client-certificate"), "required with client-key")),
        (Some(cert), Some(key)) => {
            let cf = field_of("client-certificate", &user.client_certificate_data);
            let certs = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(&cf, e.to_string()))?;
            if certs.is_empty() {
                return Err(err(cf, "no PEM certificate in it"));
            }
            let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                err(
                    field_of("client-key", &user.client_key_data),
                    format!("no PEM private key in it ({e})"),
                )
            })?;
            Some((certs, key))
        }
    };
    // As client-go: a token file wins over a token (it is re-read, so it can rotate).
    let token = match (&user.token_file, &user.token) {
        (Some(f), _) => {
            let p = file(f);
            let t = std::fs::read_to_string(&p)
                .map_err(|e| err(at("tokenFile"), format!("{}: {e}", p.display())))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                return Err(err(at("tokenFile"), format!("{}: empty", p.display())));
            }
            Some(t)
        }
        (None, Some(t)) if t.trim().is_empty() => return Err(err(at("token"), "empty")),
        (None, Some(t)) => Some(t.trim().to_string()),
        (None, None) => None,
    };
    if token.as_deref().is_some_and(|t| t.contains(['\r', '\n'])) {
        return Err(err(at("token"), "more than one line"));
    }
    if identity.is_none() && token.is_none() {
        for (field, set) in [
            ("exec", user.exec.is_some()),
            ("auth-provider", user.auth_provider.is_some()),
        ] {
            if set {
                return Err(err(
                    at(field),
                    "not supported: lb-agent uses a client certificate (client-certificate and client-key) or a bearer token (token, tokenFile)",
                ));
            }
        }
        return Err(err(
            format!("users[{u}].user"),
            "no credentials: client-certificate and client-key (or their -data forms), token or tokenFile",
        ));
    }
    Ok(Credentials {
        user: user_name,
        identity,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::health::tls_watch::tests::{Dir, CERT, KEY};

    /// A certificate and its key, PEM.
    fn cert_and_key() -> (String, String) {
        (CERT.to_string(), KEY.to_string())
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// kubeadm's kubelet.conf shape, with `user` as the user's fields.
    fn kubeconfig(user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: AAAA\n    server: https://192.0.2.10:6443\n  name: default-cluster\n\
             contexts:\n- context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\n  name: default-context\n\
             current-context: default-context\npreferences: {{}}\nusers:\n- name: other\n  user:\n    token: nope\n- name: default-auth\n  user:\n{user}"
        )
    }

    #[test]
    fn kubelet_conf_with_one_file_holding_certificate_and_key() {
        let d = Dir::new("paths");
        let (cert, key) = cert_and_key();
        // kubelet-client-current.pem: both in one file, as kubelet rotates it.
        std::fs::write(d.0.join("client.pem"), format!("{cert}{key}")).unwrap();
        let text = kubeconfig("    client-certificate: client.pem\n    client-key: client.pem\n");
        std::fs::write(d.0.join("kubelet.conf"), &text).unwrap();
        let c = load(&d.0.join("kubelet.conf")).unwrap();
        assert_eq!(c.user, "default-auth");
        assert!(c.token.is_none());
        let (certs, _) = c.identity.expect("a client certificate");
        assert_eq!(certs.len(), 1);
        // Absolute paths are taken as they are.
        let abs = d.0.join("client.pem").display().to_string();
        let text = kubeconfig(&format!(
            "    client-certificate: {abs}\n    client-key: {abs}\n"
        ));
        assert!(parse(&text, Path::new("/nonexistent"))
            .unwrap()
            .identity
            .is_some());
        // It makes a TLS client config with the probes' verification.
        let health = crate::config::HealthConfig {
            insecure_skip_verify: true,
            ..Default::default()
        };
        let c = parse(&text, Path::new("/")).unwrap();
        crate::health::client_config(&health, c.identity).unwrap();
    }

    #[test]
    fn data_forms() {
        let (cert, key) = cert_and_key();
        let text = kubeconfig(&format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&cert),
            b64(&key)
        ));
        let c = parse(&text, Path::new("/")).unwrap();
        assert!(c.identity.is_some());
        assert!(!format!("{c:?}").contains("BEGIN"), "{c:?}");
    }

    #[test]
    fn tokens() {
        let c = parse(&kubeconfig("    token: abc.def\n"), Path::new("/")).unwrap();
        assert_eq!(c.token.as_deref(), Some("abc.def"));
        assert!(c.identity.is_none());
        assert!(!format!("{c:?}").contains("abc.def"));
        let d = Dir::new("token");
        std::fs::write(d.0.join("token"), "from-file\n").unwrap();
        // The file wins, as client-go has it.
        let c = parse(
            &kubeconfig("    token: inline\n    tokenFile: token\n"),
            &d.0,
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("from-file"));
    }

    fn assert_field(user: &str, field: &str, needle: &str) {
        let e = parse(&kubeconfig(user), Path::new("/nonexistent")).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let (cert, _) = cert_and_key();
        assert_field(
            "    client-certificate: /nonexistent/client.pem\n    client-key: /nonexistent/client.pem\n",
            "users[1].user.client-certificate",
            "/nonexistent/client.pem: No such file",
        );
        assert_field(
            &format!("    client-certificate-data: {}\n", b64(&cert)),
            "users[1].user.client-key",
            "required with client-certificate",
        );
        assert_field(
            &format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&cert),
                b64(&cert)
            ),
            "users[1].user.client-key-data",
            "no PEM private key",
        );
        assert_field(
            &format!(
                "    client-certificate-data: {}\n    client-certificate: c.pem\n    client-key-data: x\n",
                b64(&cert)
            ),
            "users[1].user.client-certificate-data",
            "client-certificate is set too",
        );
        assert_field(
            "    client-certificate-data: '%%%'\n    client-key-data: eA==\n",
            "users[1].user.client-certificate-data",
            "not base64",
        );
        assert_field(
            "    client-certificate-data: eA==\n    client-key-data: eA==\n",
            "users[1].user.client-certificate-data",
            "no PEM certificate",
        );
        assert_field(
            "    exec:\n      command: aws\n",
            "users[1].user.exec",
            "not supported",
        );
        assert_field("    username: admin\n", "users[1].user", "no credentials");
        assert_field("    token: ''\n", "users[1].user.token", "empty");
        assert_field(
            "    tokenFile: /nonexistent/token\n",
            "users[1].user.tokenFile",
            "No such file",
        );
        let e = parse(
            &kubeconfig("    token: t\n").replace("current-context: default-context", ""),
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "current-context: not set");
        let e = parse(
            &kubeconfig("    token: t\n")
                .replace("current-context: default-context", "current-context: x"),
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "current-context: \"x\": no context of that name in contexts"
        );
        let e = parse(
            &kubeconfig("    token: t\n").replace("user: default-auth", "user: nobody"),
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "contexts[0].context.user: \"nobody\": no user of that name in users"
        );
        let e = parse("users: [", Path::new("/")).unwrap_err();
        assert_eq!(e.field, "(yaml)");
        let e = load(Path::new("/nonexistent/kubelet.conf")).unwrap_err();
        assert_eq!(e.field, "(file)");
    }
}
