//! Bearer tokens: HMAC-SHA256-signed JWTs (`HS256`) carrying a subject and a role.
//!
//! | role | may |
//! |------|-----|
//! | `trader` | read and trade the portfolios it owns (owner = token subject) |
//! | `broker` | record executions on any order, read orders |
//! | `auditor` | read everything, including the global log; change nothing |
//! | `admin` | everything, including dead letters |
//!
//! Only `HS256` is accepted (a token claiming `alg: none` or anything else is refused before its signature is
//! looked at; `typ` is optional, as RFC 7519 makes it); signatures are compared in constant time; tokens
//! expire. Issue one with `ledger token`.
//!
//! The secret must be at least [`SECRET_LEN_MIN`] bytes and look random: obviously weak ones (a repeated
//! pattern, or fewer than [`SECRET_ENTROPY_BITS_MIN`] bits by a character-frequency estimate, such as 32 × "a")
//! are refused at start-up. Make one with `openssl rand -base64 32` or `head -c 32 /dev/urandom | base64`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Shortest secret accepted, in bytes.
pub const SECRET_LEN_MIN: usize = 32;
/// Least entropy a secret must show, in bits, estimated from its byte frequencies (Shannon entropy × length):
/// 32 random bytes score about 144, their hex or base64 rendering over 190, 32 × "a" zero.
pub const SECRET_ENTROPY_BITS_MIN: f64 = 128.0;
/// Longest token accepted, in bytes (tokens arrive in headers and WebSocket messages).
pub const TOKEN_LEN_MAX: usize = 4_096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Trader,
    Broker,
    Auditor,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trader" => Ok(Role::Trader),
            "broker" => Ok(Role::Broker),
            "auditor" => Ok(Role::Auditor),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (trader, broker, auditor, admin)")),
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
}

impl Principal {
    pub fn can_read_portfolio(&self, owner: &str) -> bool {
        match self.role {
            Role::Trader => owner == self.subject,
            Role::Auditor | Role::Admin => true,
            Role::Broker => false,
        }
    }

    pub fn can_trade_portfolio(&self, owner: &str) -> bool {
        match self.role {
            Role::Trader => owner == self.subject,
            Role::Admin => true,
            Role::Auditor | Role::Broker => false,
        }
    }

    /// Whether the role may read portfolios at all (traders their own).
    pub fn can_read_portfolios(&self) -> bool {
        matches!(self.role, Role::Trader | Role::Auditor | Role::Admin)
    }

    /// Whether the role may trade at all (traders their own portfolios, admins every one).
    pub fn can_trade(&self) -> bool {
        matches!(self.role, Role::Trader | Role::Admin)
    }

    pub fn can_read_any_order(&self) -> bool {
        matches!(self.role, Role::Broker | Role::Auditor | Role::Admin)
    }

    pub fn can_record_executions(&self) -> bool {
        matches!(self.role, Role::Broker | Role::Admin)
    }

    pub fn can_read_log(&self) -> bool {
        matches!(self.role, Role::Auditor | Role::Admin)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unsupported token algorithm")]
    Algorithm,
    #[error("invalid token signature")]
    Signature,
    #[error("token expired")]
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    iat: i64,
    exp: i64,
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct TokenKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(…)")
    }
}

impl TokenKeys {
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, String> {
        let secret = secret.into();
        let advice = "make one with `openssl rand -base64 32`";
        if secret.len() < SECRET_LEN_MIN {
            return Err(format!("the token secret must be at least {SECRET_LEN_MIN} bytes; {advice}"));
        }
        if is_repetition(&secret) || entropy_bits(&secret) < SECRET_ENTROPY_BITS_MIN {
            return Err(format!(
                "the token secret is too weak (a repeated pattern or too few distinct bytes); {advice}"
            ));
        }
        Ok(Self { secret })
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    /// A token for `subject` with `role`, valid for `ttl` from `now`.
    pub fn issue(&self, subject: &str, role: Role, ttl: Duration, now: DateTime<Utc>) -> String {
        let header = Header { alg: "HS256".into(), typ: Some("JWT".into()) };
        let claims = Claims { sub: subject.into(), role, iat: now.timestamp(), exp: (now + ttl).timestamp() };
        let encode = |value: &dyn erased::Json| URL_SAFE_NO_PAD.encode(value.to_json());
        let signing_input = format!("{}.{}", encode(&header), encode(&claims));
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// The principal a token names, if it is well-formed, signed with our key and not expired at `now`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Principal, AuthError> {
        self.verify_until(token, now).map(|(principal, _)| principal)
    }

    /// Like [`TokenKeys::verify`], with the moment the token expires (a WebSocket closes then).
    pub fn verify_until(&self, token: &str, now: DateTime<Utc>) -> Result<(Principal, DateTime<Utc>), AuthError> {
        if token.len() > TOKEN_LEN_MAX {
            return Err(AuthError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header: Header = decode_part(header)?;
        if header.alg != "HS256" {
            return Err(AuthError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| AuthError::Malformed)?;
        let signing_input = &token[..token.rfind('.').ok_or(AuthError::Malformed)?];
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&signature).map_err(|_| AuthError::Signature)?;
        let claims: Claims = decode_part(claims)?;
        if claims.exp <= now.timestamp() {
            return Err(AuthError::Expired);
        }
        if claims.sub.is_empty() || claims.sub.len() > ledger::domain::values::EXTERNAL_ID_LEN_MAX {
            return Err(AuthError::Malformed);
        }
        let expires_at = DateTime::from_timestamp(claims.exp, 0).ok_or(AuthError::Malformed)?;
        Ok((Principal { subject: claims.sub, role: claims.role }, expires_at))
    }

    /// The principal of an `Authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, header: Option<&str>, now: DateTime<Utc>) -> Result<Principal, AuthError> {
        self.verify_header_until(header, now).map(|(principal, _)| principal)
    }

    /// Like [`TokenKeys::verify_header`], with the moment the token expires.
    pub fn verify_header_until(
        &self,
        header: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(Principal, DateTime<Utc>), AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Malformed)?;
        self.verify_until(token.trim(), now)
    }
}

/// Whether `bytes` is one shorter sequence repeated (e.g. `abcabcabc…`).
fn is_repetition(bytes: &[u8]) -> bool {
    (1..=bytes.len() / 2).any(|period| bytes.chunks(period).all(|chunk| bytes.starts_with(chunk)))
}

/// Shannon entropy of the byte frequencies × length, in bits: a cheap estimate that catches low-diversity
/// secrets (it cannot tell a random-looking phrase from a random one).
fn entropy_bits(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    for &byte in bytes {
        counts[byte as usize] += 1;
    }
    let length = bytes.len() as f64;
    let per_byte: f64 = counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let p = count as f64 / length;
            -p * p.log2()
        })
        .sum();
    per_byte * length
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

mod erased {
    /// Serialises header and claims through one helper.
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new("p0Qn3Zr8LxV1sW6tY2uA9bC4dE7fG5hJ").unwrap()
    }

    #[test]
    fn weak_secrets_are_refused_and_random_ones_accepted() {
        for weak in ["a".repeat(32), "0123456789abcdef".repeat(2), "password".repeat(4), "short".into()] {
            assert!(TokenKeys::new(weak.clone()).is_err(), "{weak}");
        }
        let random: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        assert!(TokenKeys::new(random.clone()).is_ok());
        use base64::engine::general_purpose::STANDARD;
        assert!(TokenKeys::new(STANDARD.encode(&random)).is_ok());
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        assert!(TokenKeys::new(hex).is_ok());
    }

    #[test]
    fn a_token_without_typ_is_accepted() {
        let now = Utc::now();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims { sub: "alice".into(), role: Role::Trader, iat: 0, exp: i64::from(i32::MAX) })
                .unwrap(),
        );
        let signing_input = format!("{header}.{claims}");
        let mut mac = keys().mac();
        mac.update(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        assert_eq!(keys().verify(&token, now), Ok(Principal { subject: "alice".into(), role: Role::Trader }));
    }

    #[test]
    fn issued_tokens_verify_and_carry_subject_and_role() {
        let now = Utc::now();
        let token = keys().issue("alice", Role::Trader, Duration::hours(1), now);
        assert_eq!(keys().verify(&token, now), Ok(Principal { subject: "alice".into(), role: Role::Trader }));
        let header = format!("Bearer {token}");
        assert!(keys().verify_header(Some(&header), now).is_ok());
        assert_eq!(keys().verify_header(None, now), Err(AuthError::Missing));
    }

    #[test]
    fn tampered_expired_and_foreign_tokens_are_refused() {
        let now = Utc::now();
        let token = keys().issue("alice", Role::Trader, Duration::hours(1), now);
        assert_eq!(keys().verify(&token, now + Duration::hours(2)), Err(AuthError::Expired));
        let other = TokenKeys::new("another secret of at least 32 bytes!!").unwrap();
        assert_eq!(other.verify(&token, now), Err(AuthError::Signature));
        // Promote the role in the claims without re-signing.
        let parts: Vec<&str> = token.split('.').collect();
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims { sub: "alice".into(), role: Role::Admin, iat: 0, exp: i64::MAX }).unwrap(),
        );
        let forged = format!("{}.{}.{}", parts[0], claims, parts[2]);
        assert_eq!(keys().verify(&forged, now), Err(AuthError::Signature));
        // alg: none
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(keys().verify(&format!("{none}.{claims}."), now), Err(AuthError::Algorithm));
        assert_eq!(keys().verify("garbage", now), Err(AuthError::Malformed));
        assert!(TokenKeys::new("short").is_err());
    }

    #[test]
    fn permissions_follow_the_role() {
        let trader = Principal { subject: "alice".into(), role: Role::Trader };
        assert!(trader.can_trade_portfolio("alice") && !trader.can_trade_portfolio("bob"));
        assert!(!trader.can_read_log() && !trader.can_record_executions());
        let auditor = Principal { subject: "audit".into(), role: Role::Auditor };
        assert!(auditor.can_read_portfolio("bob") && !auditor.can_trade_portfolio("bob") && auditor.can_read_log());
        let broker = Principal { subject: "gw".into(), role: Role::Broker };
        assert!(broker.can_record_executions() && !broker.can_read_portfolio("alice"));
    }
}
