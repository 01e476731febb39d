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
//! looked at); signatures are compared in constant time; tokens expire. Issue one with `ledger token`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Shortest secret accepted, in bytes.
pub const SECRET_LEN_MIN: usize = 32;
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
    typ: String,
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
        if secret.len() < SECRET_LEN_MIN {
            return Err(format!("the token secret must be at least {SECRET_LEN_MIN} bytes"));
        }
        Ok(Self { secret })
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    /// A token for `subject` with `role`, valid for `ttl` from `now`.
    pub fn issue(&self, subject: &str, role: Role, ttl: Duration, now: DateTime<Utc>) -> String {
        let header = Header { alg: "HS256".into(), typ: "JWT".into() };
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
        Ok(Principal { subject: claims.sub, role: claims.role })
    }

    /// The principal of an `Authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, header: Option<&str>, now: DateTime<Utc>) -> Result<Principal, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Malformed)?;
        self.verify(token.trim(), now)
    }
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
        TokenKeys::new("0123456789abcdef0123456789abcdef").unwrap()
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
