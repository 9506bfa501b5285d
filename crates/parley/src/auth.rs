//! Access tokens: JWTs signed (HS256) with an API key's secret, naming the room and the
//! identity they admit. With no keys configured Parley runs in open mode.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The API key that signed it.
    pub iss: String,
    /// The identity (user) it admits.
    pub sub: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The room it admits to.
    pub room: String,
    pub exp: u64,
    pub nbf: u64,
    #[serde(default = "yes")]
    pub publish: bool,
    #[serde(default = "yes")]
    pub subscribe: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an access token is required (?token= in the link)")]
    Missing,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is for room {0:?}, not this one")]
    WrongRoom(String),
    #[error("the access token's signature is not valid")]
    BadSignature,
    #[error("the access token names an unknown API key")]
    UnknownKey,
    #[error("the access token is malformed: {0}")]
    Malformed(String),
}

/// API keys and their secrets.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    keys: BTreeMap<String, String>,
}

impl Auth {
    pub fn new(keys: BTreeMap<String, String>) -> Self {
        Auth { keys }
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `secret` is the secret of one of the keys (for the admin API).
    pub fn is_secret(&self, secret: &str) -> bool {
        // Constant time: the comparison must not tell an attacker how much of a secret matched.
        self.keys.values().any(|s| {
            aws_lc_rs::constant_time::verify_slices_are_equal(s.as_bytes(), secret.as_bytes())
                .is_ok()
        })
    }

    /// Checks a token for `room`.
    pub fn verify(&self, token: Option<&str>, room: &str) -> Result<Claims, AuthError> {
        let claims = self.verify_identity(token)?;
        if claims.room != room {
            return Err(AuthError::WrongRoom(claims.room));
        }
        Ok(claims)
    }

    /// Checks a token's signature and lifetime; its identity is the `sub` of the claims.
    pub fn verify_identity(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let key = header.kid.ok_or(AuthError::UnknownKey)?;
        let secret = self.keys.get(&key).ok_or(AuthError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.iss != key {
            return Err(AuthError::Malformed("issuer and key id differ".into()));
        }
        Ok(claims)
    }
}

/// What `parley token` puts in a token.
pub struct Grant<'a> {
    pub room: &'a str,
    pub identity: &'a str,
    pub name: Option<&'a str>,
    pub publish: bool,
    pub subscribe: bool,
    pub ttl: Duration,
}

/// Signs a token with API key `key` and its `secret`.
pub fn mint(
    key: &str,
    secret: &str,
    grant: &Grant<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        iss: key.into(),
        sub: grant.identity.into(),
        name: grant.name.map(Into::into),
        room: grant.room.into(),
        exp: now + grant.ttl.as_secs(),
        nbf: now.saturating_sub(1),
        publish: grant.publish,
        subscribe: grant.subscribe,
    };
    let header = Header {
        kid: Some(key.into()),
        ..Header::new(Algorithm::HS256)
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Parses a duration like `90s`, `15m`, `1h`, `2d`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 1h or 2d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(BTreeMap::from([("k1".into(), "s3cret".into())]))
    }

    fn grant(room: &str, ttl: Duration) -> Grant<'_> {
        Grant {
            room,
            identity: "ada",
            name: Some("Ada"),
            publish: true,
            subscribe: false,
            ttl,
        }
    }

    #[test]
    fn a_valid_token_admits_its_room_only() {
        let t = mint("k1", "s3cret", &grant("demo", Duration::from_secs(60))).expect("mint");
        let c = auth().verify(Some(&t), "demo").expect("valid");
        assert_eq!((c.sub.as_str(), c.name.as_deref()), ("ada", Some("Ada")));
        assert!(c.publish && !c.subscribe);
        assert_eq!(
            auth().verify(Some(&t), "other"),
            Err(AuthError::WrongRoom("demo".into()))
        );
    }

    #[test]
    fn expired_forged_unknown_and_missing_tokens_are_refused() {
        let mut expired = Claims {
            iss: "k1".into(),
            sub: "ada".into(),
            name: None,
            room: "demo".into(),
            exp: 1,
            nbf: 0,
            publish: true,
            subscribe: true,
        };
        let header = Header {
            kid: Some("k1".into()),
            ..Header::new(Algorithm::HS256)
        };
        let t = jsonwebtoken::encode(&header, &expired, &EncodingKey::from_secret(b"s3cret"))
            .expect("encode");
        assert_eq!(auth().verify(Some(&t), "demo"), Err(AuthError::Expired));

        expired.exp = u64::MAX / 2;
        let forged = jsonwebtoken::encode(&header, &expired, &EncodingKey::from_secret(b"guess"))
            .expect("encode");
        assert_eq!(
            auth().verify(Some(&forged), "demo"),
            Err(AuthError::BadSignature)
        );

        let other = mint("k2", "s3cret", &grant("demo", Duration::from_secs(60))).expect("mint");
        assert_eq!(
            auth().verify(Some(&other), "demo"),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(auth().verify(None, "demo"), Err(AuthError::Missing));
        assert!(matches!(
            auth().verify(Some("not.a.jwt"), "demo"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
