//! Client tokens: issuing (for /inner/get_token), verifying, and revocation.
//!
//! Tokens are JWTs. quickim issues HS256 tokens with its secret; a deployment may also accept
//! tokens signed by the business system with RS256 or EdDSA keys (`jwt_public_keys`). `exp`
//! and `iat` are always required. A token is revoked when /inner/kick_user named its user (and
//! platform) after the token was issued: every gateway keeps the revocations in memory, loaded
//! at start from the conversation service, pushed to it by the cluster control plane and
//! polled for the ones a node missed.
//!
//! Issue time, in milliseconds: `iat_ms` when the token has it (quickim's own tokens do), else
//! `iat`, which may be fractional (a NumericDate may carry milliseconds). A token whose `iat`
//! is whole seconds counts as issued at the start of that second, so a kick in the same second
//! revokes it. A token without `iat` is refused: nothing could tell whether it is older than a
//! kick.

use std::collections::HashMap;
use std::sync::RwLock;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quickim_shared::config::{Config, ConfigError};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::{check_platform, check_user_id};
use quickim_shared::protocol::service::Revocation;
use quickim_shared::time::now_ms;
use serde::{Deserialize, Serialize};

/// The claims of a client token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The platform (`web`, `ios`, ...); "unknown" when a foreign token has none.
    #[serde(default = "unknown_platform")]
    pub plt: String,
    /// Issued at (seconds; may be fractional). Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<serde_json::Number>,
    /// Issued at (milliseconds), for exact revocation; quickim sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<i64>,
    /// Expiry (seconds); always required.
    pub exp: i64,
}

fn unknown_platform() -> String {
    "unknown".to_string()
}

impl Claims {
    /// Issue time in milliseconds (see the module docs), if the token says.
    pub fn issued_ms(&self) -> Option<i64> {
        if let Some(ms) = self.iat_ms {
            return Some(ms);
        }
        let iat = self.iat.as_ref()?;
        match iat.as_i64() {
            Some(s) => Some(s.saturating_mul(1000)),
            None => iat.as_f64().filter(|f| f.is_finite()).map(|f| (f * 1000.0).floor() as i64),
        }
    }
}

/// The authenticated caller of a public route.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From the token's `sub`.
    pub user_id: String,
    /// From the token's `plt`.
    pub platform: String,
    /// When the token was issued (ms).
    pub issued_ms: i64,
    /// When the token expires (ms).
    pub expires_ms: i64,
}

/// Clock skew allowed on `exp` and `iat`, seconds.
const LEEWAY_S: i64 = 5;

/// (platform or every platform, tokens issued before this ms are rejected)
type PlatformRevocation = (Option<String>, i64);

/// The claims of a /notify ticket: who (as the token it was exchanged for), which token
/// life it inherits, and its own short life and id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TicketClaims {
    sub: String,
    plt: String,
    /// The token's issue time (ms): revocations apply to tickets as to their token.
    tiat: i64,
    /// The token's expiry (ms): a stream opened with the ticket ends there.
    texp: i64,
    /// The ticket's expiry (seconds).
    exp: i64,
    /// Random id: a ticket is good once.
    jti: String,
}

/// A verified /notify ticket, not yet used up.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Whom it stands for.
    pub caller: Caller,
    /// Its id, to use it up.
    pub id: String,
    /// When it expires (ms).
    pub expires_ms: i64,
}

/// Issues and verifies tokens.
pub struct Auth {
    encoding: EncodingKey,
    hs256: DecodingKey,
    /// Tickets are signed with a key of their own: a ticket is no token, nor the reverse.
    ticket_encoding: EncodingKey,
    ticket_decoding: DecodingKey,
    ticket_ttl_s: u64,
    rsa: Vec<DecodingKey>,
    ed: Vec<DecodingKey>,
    default_ttl_s: u64,
    max_ttl_s: u64,
    revoked: RwLock<HashMap<String, Vec<PlatformRevocation>>>,
}

impl Auth {
    /// Builds from the configuration (`jwt_secret` must be set by now).
    pub fn from_config(config: &Config) -> Result<Auth, ConfigError> {
        let secret = config.jwt_secret.as_ref().ok_or_else(|| ConfigError("jwt_secret is not set".into()))?;
        let mut rsa = Vec::new();
        let mut ed = Vec::new();
        for path in &config.jwt_public_keys {
            let pem =
                std::fs::read(path).map_err(|e| ConfigError(format!("jwt_public_keys: {}: {e}", path.display())))?;
            if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                rsa.push(k);
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                ed.push(k);
            } else {
                return Err(ConfigError(format!(
                    "jwt_public_keys: {} is neither an RSA nor an Ed25519 public key (PEM)",
                    path.display()
                )));
            }
        }
        let ticket_key = format!("{}\u{0}quickim-notify-ticket", secret.expose());
        Ok(Auth {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            hs256: DecodingKey::from_secret(secret.expose().as_bytes()),
            ticket_encoding: EncodingKey::from_secret(ticket_key.as_bytes()),
            ticket_decoding: DecodingKey::from_secret(ticket_key.as_bytes()),
            ticket_ttl_s: config.notify_ticket_ttl_s,
            rsa,
            ed,
            default_ttl_s: config.token_ttl_s,
            max_ttl_s: config.token_max_ttl_s,
            revoked: RwLock::new(HashMap::new()),
        })
    }

    /// Issues an HS256 token; answers it with its expiry (ms).
    pub fn issue(&self, user_id: &str, platform: &str, ttl_s: Option<u64>) -> Result<(String, i64), ServiceError> {
        check_user_id("user_id", user_id)?;
        check_platform(platform)?;
        let ttl = ttl_s.unwrap_or(self.default_ttl_s);
        if ttl == 0 || ttl > self.max_ttl_s {
            return Err(ServiceError::invalid(format!("ttl_s must be within 1–{}", self.max_ttl_s)));
        }
        let now = now_ms();
        let exp = now / 1000 + ttl as i64;
        let claims = Claims {
            sub: user_id.into(),
            plt: platform.into(),
            iat: Some((now / 1000).into()),
            iat_ms: Some(now),
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ServiceError::internal(format!("cannot sign a token: {e}")))?;
        Ok((token, exp * 1000))
    }

    /// A single-use ticket for `caller`'s next /notify connection (see docs/protocol.md);
    /// answers it with its expiry (ms).
    pub fn issue_ticket(&self, caller: &Caller) -> Result<(String, i64), ServiceError> {
        let now = now_ms();
        let exp = (now / 1000 + self.ticket_ttl_s as i64).min(caller.expires_ms / 1000);
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let claims = TicketClaims {
            sub: caller.user_id.clone(),
            plt: caller.platform.clone(),
            tiat: caller.issued_ms,
            texp: caller.expires_ms,
            exp,
            jti,
        };
        let ticket = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.ticket_encoding)
            .map_err(|e| ServiceError::internal(format!("cannot sign a ticket: {e}")))?;
        Ok((ticket, exp * 1000))
    }

    /// Verifies a ticket (signature, expiry, revocation of its token); using it up is the
    /// caller's next step.
    pub fn verify_ticket(&self, ticket: &str) -> Result<Ticket, ServiceError> {
        let invalid = |why: &str| ServiceError::new(ErrorCode::InvalidToken, why.to_string());
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<TicketClaims>(ticket, &self.ticket_decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => invalid("ticket expired"),
                _ => invalid("invalid ticket"),
            })?
            .claims;
        if self.is_revoked(&claims.sub, &claims.plt, claims.tiat) {
            return Err(invalid("token revoked"));
        }
        Ok(Ticket {
            caller: Caller {
                user_id: claims.sub,
                platform: claims.plt,
                issued_ms: claims.tiat,
                expires_ms: claims.texp,
            },
            id: claims.jti,
            expires_ms: claims.exp * 1000,
        })
    }

    /// Verifies a token: signature, expiry, identity shape, revocation.
    pub fn verify(&self, token: &str) -> Result<Caller, ServiceError> {
        let invalid = |why: &str| ServiceError::new(ErrorCode::InvalidToken, why.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed token"))?;
        let keys: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => vec![&self.hs256],
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => self.rsa.iter().collect(),
            Algorithm::EdDSA => self.ed.iter().collect(),
            _ => Vec::new(),
        };
        if keys.is_empty() {
            return Err(invalid("token algorithm not accepted"));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = LEEWAY_S as u64;
        let mut last = invalid("invalid token");
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return self.accept(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => invalid("token expired"),
                        jsonwebtoken::errors::ErrorKind::InvalidSignature => invalid("bad token signature"),
                        _ => invalid("invalid token"),
                    }
                }
            }
        }
        Err(last)
    }

    fn accept(&self, claims: Claims) -> Result<Caller, ServiceError> {
        let invalid = |why: &str| ServiceError::new(ErrorCode::InvalidToken, why.to_string());
        check_user_id("sub", &claims.sub).map_err(|_| invalid("token subject is not a valid user id"))?;
        check_platform(&claims.plt).map_err(|_| invalid("token platform is not valid"))?;
        let issued = claims.issued_ms().ok_or_else(|| invalid("token has no iat (issue time)"))?;
        if issued > now_ms() + LEEWAY_S * 1000 {
            return Err(invalid("token issued in the future"));
        }
        if self.is_revoked(&claims.sub, &claims.plt, issued) {
            return Err(invalid("token revoked"));
        }
        Ok(Caller { user_id: claims.sub, platform: claims.plt, issued_ms: issued, expires_ms: claims.exp * 1000 })
    }

    /// Whether a token of `user_id` on `platform` issued at `issued_ms` is revoked.
    pub fn is_revoked(&self, user_id: &str, platform: &str, issued_ms: i64) -> bool {
        let revoked = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        revoked.get(user_id).is_some_and(|list| {
            list.iter().any(|(p, before)| issued_ms < *before && p.as_deref().is_none_or(|p| p == platform))
        })
    }

    /// Records a revocation (from the control plane, the start-up load or the poll); answers
    /// whether it revokes more than was known.
    pub fn revoke(&self, r: &Revocation) -> bool {
        let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let list = revoked.entry(r.user_id.clone()).or_default();
        match list.iter_mut().find(|(p, _)| *p == r.platform) {
            Some((_, before)) if *before >= r.before_ms => false,
            Some((_, before)) => {
                *before = r.before_ms;
                true
            }
            None => {
                list.push((r.platform.clone(), r.before_ms));
                true
            }
        }
    }

    /// Forgets revocations older than the longest token lifetime (their tokens expired).
    pub fn prune(&self) {
        let horizon = now_ms() - self.max_ttl_s as i64 * 1000;
        let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        revoked.retain(|_, list| {
            list.retain(|(_, before)| *before >= horizon);
            !list.is_empty()
        });
    }

    /// The oldest revocation time still relevant (for loading at start).
    pub fn revocation_horizon_ms(&self) -> i64 {
        now_ms() - self.max_ttl_s as i64 * 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickim_shared::config::Secret;

    fn auth() -> Auth {
        let config = Config { jwt_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")), ..Config::default() };
        Auth::from_config(&config).unwrap()
    }

    #[test]
    fn issued_tokens_verify() {
        let a = auth();
        let (token, exp) = a.issue("alice", "web", Some(60)).unwrap();
        let c = a.verify(&token).unwrap();
        assert_eq!((c.user_id.as_str(), c.platform.as_str()), ("alice", "web"));
        assert!(exp > now_ms());
    }

    #[test]
    fn forged_expired_and_malformed_tokens_fail() {
        let a = auth();
        let other = Auth::from_config(&Config {
            jwt_secret: Some(Secret::new("another-secret-another-secret-xx")),
            ..Config::default()
        })
        .unwrap();
        let (forged, _) = other.issue("alice", "web", None).unwrap();
        assert_eq!(a.verify(&forged).unwrap_err().message, "bad token signature");
        let claims = Claims {
            sub: "alice".into(),
            plt: "web".into(),
            iat: Some(0.into()),
            iat_ms: None,
            exp: now_ms() / 1000 - 60,
        };
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap();
        assert_eq!(a.verify(&expired).unwrap_err().message, "token expired");
        assert_eq!(a.verify("not.a.token").unwrap_err().code, ErrorCode::InvalidToken);
        // alg=none and foreign algorithms are refused.
        let none = format!("{}.{}.", "eyJhbGciOiJub25lIn0", "eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ");
        assert_eq!(a.verify(&none).unwrap_err().code, ErrorCode::InvalidToken);
        // A token without exp is refused.
        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &NoExp { sub: "a".into() }, &a.encoding).unwrap();
        assert_eq!(a.verify(&t).unwrap_err().code, ErrorCode::InvalidToken);
    }

    #[test]
    fn revocation_applies_to_older_tokens_only() {
        let a = auth();
        let (old, _) = a.issue("alice", "web", None).unwrap();
        let (ios, _) = a.issue("alice", "ios", None).unwrap();
        a.revoke(&Revocation { user_id: "alice".into(), platform: Some("web".into()), before_ms: now_ms() + 1 });
        assert_eq!(a.verify(&old).unwrap_err().message, "token revoked");
        assert!(a.verify(&ios).is_ok(), "another platform is untouched");
        std::thread::sleep(std::time::Duration::from_millis(3));
        let (fresh, _) = a.issue("alice", "web", None).unwrap();
        assert!(a.verify(&fresh).is_ok(), "tokens issued after the kick work");
        a.revoke(&Revocation { user_id: "alice".into(), platform: None, before_ms: now_ms() + 1 });
        assert!(a.verify(&ios).is_err());
    }

    fn signed(a: &Auth, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap()
    }

    #[test]
    fn tickets_are_not_tokens_and_follow_their_token() {
        let a = auth();
        let (token, _) = a.issue("alice", "web", Some(600)).unwrap();
        let caller = a.verify(&token).unwrap();
        let (ticket, exp) = a.issue_ticket(&caller).unwrap();
        assert!(exp <= now_ms() + 31_000);
        let t = a.verify_ticket(&ticket).unwrap();
        assert_eq!((t.caller.user_id.as_str(), t.caller.issued_ms), ("alice", caller.issued_ms));
        assert_eq!(t.id.len(), 32);
        assert!(a.verify(&ticket).is_err(), "a ticket is not a bearer token");
        assert!(a.verify_ticket(&token).is_err(), "a token is not a ticket");
        a.revoke(&Revocation { user_id: "alice".into(), platform: None, before_ms: now_ms() + 1 });
        assert_eq!(a.verify_ticket(&ticket).unwrap_err().message, "token revoked");
    }

    #[test]
    fn issue_time_rules() {
        let a = auth();
        let now = now_ms();
        let exp = now / 1000 + 600;
        // No iat: refused, whatever the revocations.
        let t = signed(&a, serde_json::json!({"sub": "carol", "exp": exp}));
        assert_eq!(a.verify(&t).unwrap_err().message, "token has no iat (issue time)");
        // iat in the future (beyond the leeway): refused.
        let t = signed(&a, serde_json::json!({"sub": "carol", "iat": now / 1000 + 60, "exp": exp}));
        assert_eq!(a.verify(&t).unwrap_err().message, "token issued in the future");
        // A fractional iat carries milliseconds; iat_ms wins over iat.
        let c: Claims = serde_json::from_value(serde_json::json!({"sub":"c","iat":1700000000.25,"exp":1})).unwrap();
        assert_eq!(c.issued_ms(), Some(1_700_000_000_250));
        let c: Claims =
            serde_json::from_value(serde_json::json!({"sub":"c","iat":1700000000,"iat_ms":1700000000999u64,"exp":1}))
                .unwrap();
        assert_eq!(c.issued_ms(), Some(1_700_000_000_999));

        // A kick at k ms: in the same second, tokens are ordered by milliseconds when they
        // carry them; a whole-second iat counts as the start of its second.
        let k = (now / 1000 - 10) * 1000 + 500;
        a.revoke(&Revocation { user_id: "carol".into(), platform: None, before_ms: k });
        let at = |ms: i64| serde_json::json!({"sub": "carol", "iat": ms as f64 / 1000.0, "exp": exp});
        assert!(a.verify(&signed(&a, at(k - 1))).is_err(), "1 ms before the kick: revoked");
        assert!(a.verify(&signed(&a, at(k + 1))).is_ok(), "1 ms after the kick: valid");
        let whole = signed(&a, serde_json::json!({"sub": "carol", "iat": k / 1000, "exp": exp}));
        assert!(a.verify(&whole).is_err(), "whole seconds: the start of the kick's second");
        let next = signed(&a, serde_json::json!({"sub": "carol", "iat": k / 1000 + 1, "exp": exp}));
        assert!(a.verify(&next).is_ok(), "the next second: valid");
        // Revocations only ever move forward.
        assert!(!a.revoke(&Revocation { user_id: "carol".into(), platform: None, before_ms: k - 1 }));
        assert!(a.revoke(&Revocation { user_id: "carol".into(), platform: None, before_ms: k + 1 }));
    }

    #[test]
    fn tokens_signed_by_listed_public_keys_verify() {
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
        let config = Config {
            jwt_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")),
            jwt_public_keys: vec![format!("{keys}/ed25519.pub.pem").into(), format!("{keys}/rsa.pub.pem").into()],
            ..Config::default()
        };
        let a = Auth::from_config(&config).unwrap();
        let claims = Claims {
            sub: "bob".into(),
            plt: "ios".into(),
            iat: Some((now_ms() / 1000).into()),
            iat_ms: None,
            exp: now_ms() / 1000 + 60,
        };
        let ed = EncodingKey::from_ed_pem(&std::fs::read(format!("{keys}/ed25519.pem")).unwrap()).unwrap();
        let t = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &ed).unwrap();
        assert_eq!(a.verify(&t).unwrap().user_id, "bob");
        let rsa = EncodingKey::from_rsa_pem(&std::fs::read(format!("{keys}/rsa.pem")).unwrap()).unwrap();
        let t = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap();
        assert_eq!(a.verify(&t).unwrap().platform, "ios");
        // Without the public keys configured, the same tokens are refused.
        assert!(auth().verify(&t).is_err());
        // A key file that is not a public key stops start-up.
        let bad = Config { jwt_public_keys: vec![format!("{keys}/missing.pem").into()], ..config };
        assert!(Auth::from_config(&bad).is_err());
    }

    #[test]
    fn issue_checks_its_input() {
        let a = auth();
        assert!(a.issue("bad id", "web", None).is_err());
        assert!(a.issue("alice", "", None).is_err());
        assert!(a.issue("alice", "web", Some(0)).is_err());
        assert!(a.issue("alice", "web", Some(u64::MAX)).is_err());
    }
}
