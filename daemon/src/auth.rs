//! Proxy keys: who may call orproxy, and under which name their usage is recorded.
//!
//! Keys are held only as SHA-256 digests and compared in constant time, so neither memory
//! dumps nor response timing reveal them.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Diagnostic};
use crate::table::Env;

/// The configured proxy keys; empty means auth is off.
#[derive(Debug, Default, Clone)]
pub struct Auth {
    keys: Vec<ProxyKey>,
    /// `auth.allow_open`: auth-off mode may listen on a non-loopback address.
    pub allow_open: bool,
}

#[derive(Debug, Clone)]
struct ProxyKey {
    name: String,
    digest: [u8; 32],
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither `Authorization: Bearer` nor `x-api-key` was sent.
    #[error("missing proxy key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// A key was sent and matches none.
    #[error("invalid proxy key")]
    Invalid,
}

impl Auth {
    /// Resolves `auth.keys` from the environment; every problem is reported.
    pub fn from_config(
        file: &str,
        cfg: &AuthConfig,
        env: &dyn Env,
    ) -> Result<Auth, Vec<Diagnostic>> {
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for spanned in &cfg.keys {
            let key = &spanned.value;
            let at = spanned.referenced;
            let mut fail = |msg: String| {
                errors.push(Diagnostic::at(
                    file,
                    at,
                    format!("auth key `{}`: {msg}", key.name.escape_debug()),
                ))
            };
            // An empty name would read as "no key" in reports and in the budgets' spend; a
            // blank one, one padded with spaces or one with control characters cannot be told
            // apart in logs either.
            if key.name.trim().is_empty()
                || key.name.trim() != key.name
                || key.name.chars().any(char::is_control)
            {
                fail(
                    "the name must not be empty or blank, start or end with spaces, or hold control characters"
                        .into(),
                );
                continue;
            }
            if keys.iter().any(|k: &ProxyKey| k.name == key.name) {
                fail("name used twice".into());
                continue;
            }
            let digest = match (&key.key_env, &key.key_sha256) {
                (Some(var), None) => match crate::table::secret_var(env, var) {
                    Ok(secret) => Sha256::digest(secret.as_bytes()).into(),
                    Err(problem) => {
                        fail(problem);
                        continue;
                    }
                },
                (None, Some(hex)) => match parse_hex32(hex) {
                    Some(digest) => digest,
                    None => {
                        fail("key_sha256 must be 64 hexadecimal digits".into());
                        continue;
                    }
                },
                _ => {
                    fail("set exactly one of key_env or key_sha256".into());
                    continue;
                }
            };
            keys.push(ProxyKey {
                name: key.name.clone(),
                digest,
            });
        }
        if errors.is_empty() {
            Ok(Auth {
                keys,
                allow_open: cfg.allow_open,
            })
        } else {
            Err(errors)
        }
    }

    /// The key names (never the keys), for `/admin/routes`.
    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// True when no keys are configured.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the request's key; returns the key's name (`None` in open mode).
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let presented = presented_key(headers).ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(presented).into();
        // Compare with every key, without an early exit, so timing says nothing about which matched.
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key.name.as_str());
            }
        }
        found.map(Some).ok_or(AuthError::Invalid)
    }
}

/// The key sent as `Authorization: Bearer <key>` or `x-api-key: <key>`, as bytes: a key
/// that is not ASCII was still sent, and must be refused as invalid (it matches no key,
/// every configured one being visible ASCII), not as missing.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.as_bytes().trim_ascii();
        let space = value.iter().position(|&b| b == b' ')?;
        let (scheme, key) = value.split_at(space);
        let key = key.trim_ascii();
        return (scheme.eq_ignore_ascii_case(b"bearer") && !key.is_empty()).then_some(key);
    }
    headers
        .get("x-api-key")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::table::EnvError;

    struct OneVar;

    impl Env for OneVar {
        fn var(&self, name: &str) -> Result<String, EnvError> {
            match name {
                "TEAM_A_KEY" => Ok("sk-team-a".to_owned()),
                _ => Err(EnvError::NotSet),
            }
        }
    }

    fn auth(yaml: &str) -> Result<Auth, Vec<Diagnostic>> {
        let cfg = parse("c.yaml", yaml).unwrap();
        Auth::from_config(
            "c.yaml",
            &cfg.auth.map(|s| s.value).unwrap_or_default(),
            &OneVar,
        )
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn keys_from_env_and_digest_both_work() {
        // sha256("sk-team-b")
        let digest = hex_of(&Sha256::digest(b"sk-team-b"));
        let auth = auth(&format!(
            "auth:\n  keys:\n    - {{ name: a, key_env: TEAM_A_KEY }}\n    - {{ name: b, key_sha256: \"{digest}\" }}\n"
        ))
        .unwrap();
        assert_eq!(
            auth.authenticate(&headers("authorization", "Bearer sk-team-a")),
            Ok(Some("a"))
        );
        assert_eq!(
            auth.authenticate(&headers("x-api-key", "sk-team-b")),
            Ok(Some("b"))
        );
        assert_eq!(
            auth.authenticate(&headers("authorization", "bearer  sk-team-b ")),
            Ok(Some("b"))
        );
        assert_eq!(
            auth.authenticate(&headers("authorization", "Bearer nope")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.authenticate(&headers("authorization", "Basic sk-team-a")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.authenticate(&HeaderMap::new()),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn a_key_sent_outside_ascii_is_invalid_not_missing() {
        let auth = auth("auth:\n  keys:\n    - { name: a, key_env: TEAM_A_KEY }\n").unwrap();
        for name in ["authorization", "x-api-key"] {
            let prefix = if name == "authorization" {
                "Bearer "
            } else {
                ""
            };
            let mut h = HeaderMap::new();
            let value = format!("{prefix}k\u{e9}y");
            h.insert(
                name,
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
            assert_eq!(auth.authenticate(&h), Err(AuthError::Invalid), "{name}");
        }
    }

    #[test]
    fn open_mode_lets_everyone_in() {
        let auth = auth("").unwrap();
        assert!(auth.is_open());
        assert_eq!(auth.authenticate(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn bad_key_entries_are_located() {
        let errs = auth("auth:\n  keys:\n    - { name: a, key_env: UNSET }\n    - { name: b, key_sha256: xyz }\n    - { name: c }\n    - { name: '', key_env: UNSET }\n    - { name: ' ', key_env: UNSET }\n    - { name: \"a\\nb \", key_env: UNSET }\n").unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 6);
        assert!(
            text[0].starts_with("c.yaml:3:7: auth key `a`: environment variable UNSET"),
            "{text:?}"
        );
        assert!(text[1].contains("64 hexadecimal digits"), "{text:?}");
        assert!(text[2].contains("exactly one of"), "{text:?}");
        assert!(text[3].contains("must not be empty"), "{text:?}");
        assert!(text[4].contains("must not be empty"), "{text:?}");
        assert!(
            text[5].starts_with("c.yaml:8:7: auth key `a\\nb `"),
            "{text:?}"
        );
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
