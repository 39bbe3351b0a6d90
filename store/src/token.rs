//! Auth tokens, as `--auth-token` chooses them: `simple` (random strings every
//! member learns through the log, see [`crate::auth::AuthState::add_token`]) or
//! `jwt,pub-key=...,priv-key=...,sign-method=...,ttl=...` (signed tokens any member
//! verifies alone; they carry the user and the auth revision they were issued at).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// How tokens are made and checked.
pub enum TokenProvider {
    /// Random strings kept by every member.
    Simple,
    /// Signed JSON Web Tokens.
    Jwt(Box<Jwt>),
}

/// A JWT signer and verifier.
pub struct Jwt {
    algorithm: Algorithm,
    /// Absent when only a public key is given: this member verifies but does not
    /// issue tokens.
    signing: Option<EncodingKey>,
    verifying: DecodingKey,
    ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

impl TokenProvider {
    /// Parses `--auth-token`; errors name the option at fault.
    pub fn from_flag(text: &str) -> Result<TokenProvider, String> {
        let mut parts = text.split(',');
        match parts.next().unwrap_or_default() {
            "simple" => Ok(TokenProvider::Simple),
            "jwt" => {
                let mut public = None;
                let mut private = None;
                let mut method = None;
                let mut ttl = Duration::from_secs(300);
                for option in parts {
                    let (key, value) = option.split_once('=').ok_or_else(|| {
                        format!("--auth-token: option {option:?} must be key=value")
                    })?;
                    match key {
                        "pub-key" => public = Some(value.to_string()),
                        "priv-key" => private = Some(value.to_string()),
                        "sign-method" => method = Some(value.to_string()),
                        "ttl" => {
                            ttl = crate::config::parse_duration(value)
                                .map_err(|e| format!("--auth-token: ttl: {e}"))?
                        }
                        other => return Err(format!("--auth-token: unknown option {other:?}")),
                    }
                }
                let method =
                    method.ok_or("--auth-token: jwt needs sign-method (e.g. RS256, ES256)")?;
                let algorithm: Algorithm = method
                    .parse()
                    .map_err(|_| format!("--auth-token: invalid sign-method {method:?}"))?;
                let read = |path: &str| {
                    std::fs::read(path)
                        .map_err(|e| format!("--auth-token: cannot read key {path}: {e}"))
                };
                let bad_key = |path: &str, e: jsonwebtoken::errors::Error| {
                    format!("--auth-token: {path} is not a {method} key in PEM: {e}")
                };
                let public = public.ok_or("--auth-token: jwt needs pub-key")?;
                let pem = read(&public)?;
                let verifying = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                        return Err(format!(
                            "--auth-token: sign-method {method} is not supported (use RS*, PS*, ES256, ES384 or EdDSA)"
                        ))
                    }
                    _ => DecodingKey::from_rsa_pem(&pem),
                }
                .map_err(|e| bad_key(&public, e))?;
                let signing = match private {
                    None => None,
                    Some(path) => {
                        let pem = read(&path)?;
                        Some(
                            match algorithm {
                                Algorithm::ES256 | Algorithm::ES384 => {
                                    EncodingKey::from_ec_pem(&pem)
                                }
                                Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                                _ => EncodingKey::from_rsa_pem(&pem),
                            }
                            .map_err(|e| bad_key(&path, e))?,
                        )
                    }
                };
                let jwt = Jwt {
                    algorithm,
                    signing,
                    verifying,
                    ttl,
                };
                // A key pair that does not match would issue tokens nobody accepts.
                if jwt.signing.is_some() {
                    let probe = jwt
                        .sign("probe", 1)
                        .map_err(|e| format!("--auth-token: {e}"))?;
                    if jwt.verify(&probe).is_none() {
                        return Err("--auth-token: public and private keys don't match".into());
                    }
                }
                Ok(TokenProvider::Jwt(Box::new(jwt)))
            }
            other => Err(format!(
                "--auth-token: unknown token type {other:?} (use simple or jwt,...)"
            )),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Jwt {
    /// A token for `username` at auth `revision`, valid for the TTL.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, String> {
        let key = self
            .signing
            .as_ref()
            .ok_or("auth: token signing attempted with verify-only key")?;
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp: now() + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }

    /// The user and auth revision of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Option<(String, u64)> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.verifying, &validation).ok()?;
        Some((data.claims.username, data.claims.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_flags_name_the_problem() {
        for (flag, wanted) in [
            ("bogus", "unknown token type"),
            ("jwt", "sign-method"),
            ("jwt,sign-method=RS256", "pub-key"),
            ("jwt,sign-method=XX1,pub-key=/x", "invalid sign-method"),
            (
                "jwt,sign-method=RS256,pub-key=/nonexistent",
                "cannot read key",
            ),
            ("jwt,sign-method=RS256,color=red", "unknown option"),
        ] {
            let error = TokenProvider::from_flag(flag).err().expect(flag);
            assert!(error.contains(wanted), "{flag}: {error}");
        }
        assert!(matches!(
            TokenProvider::from_flag("simple"),
            Ok(TokenProvider::Simple)
        ));
    }

    #[test]
    fn signed_tokens_verify_and_forged_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let private = dir.path().join("key.pem");
        let public = dir.path().join("pub.pem");
        std::fs::write(&private, key.serialize_pem()).unwrap();
        std::fs::write(&public, key.public_key_pem()).unwrap();
        let flag = format!(
            "jwt,pub-key={},priv-key={},sign-method=ES256,ttl=1m",
            public.display(),
            private.display()
        );
        let TokenProvider::Jwt(jwt) = TokenProvider::from_flag(&flag).unwrap() else {
            panic!("not jwt");
        };
        let token = jwt.sign("alice", 7).unwrap();
        assert_eq!(jwt.verify(&token), Some(("alice".to_string(), 7)));
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(jwt.verify(&forged), None);
        assert_eq!(jwt.verify("not.a.token"), None);
    }
}
