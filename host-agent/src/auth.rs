//! Bearer tokens: `kiln.<token-id>.<secret>`. The agent keeps only the
//! SHA-256 of the secret; the secret is 256 random bits, so a plain hash
//! is enough (no password stretching needed).

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::db::Db;
use crate::error::ApiError;
use crate::model::{Meta, Role, Token, TokenSpec, TokenState, TokenStatus};

/// A fresh token: the record to store and the value to show once.
pub fn generate(name: &str, role: Role) -> (Token, String) {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    let meta = Meta::new(name);
    let value = format!("kiln.{}.{secret}", meta.id);
    let token = Token {
        meta,
        spec: TokenSpec { role },
        status: TokenStatus {
            state: TokenState::Active,
            last_used_at: None,
        },
        secret_sha256: sha256_hex(secret.as_bytes()),
    };
    (token, value)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token behind an `Authorization` header value, or 401. A revoked
/// token is deleted, so it is refused like an unknown one.
pub fn authenticate(db: &Db, header: Option<&str>) -> Result<Token, ApiError> {
    let value = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    let mut parts = value.trim().splitn(3, '.');
    let (Some("kiln"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ApiError::unauthorized());
    };
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::unauthorized());
    }
    let token: Token = db.get(id).map_err(|_| ApiError::unauthorized())?;
    if token.meta.id != id
        || !constant_time_eq(
            token.secret_sha256.as_bytes(),
            sha256_hex(secret.as_bytes()).as_bytes(),
        )
    {
        return Err(ApiError::unauthorized());
    }
    Ok(token)
}

/// Whether `role` may use `method`.
pub fn authorize(role: Role, method: &axum::http::Method) -> Result<(), ApiError> {
    match role {
        Role::Admin => Ok(()),
        Role::Reader if method == axum::http::Method::GET || method == axum::http::Method::HEAD => {
            Ok(())
        }
        Role::Reader => Err(ApiError::forbidden()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Note;

    #[test]
    fn only_the_exact_token_of_a_stored_record_passes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s.redb")).unwrap();
        let (t, value) = generate("ops", Role::Admin);
        assert!(!serde_json::to_string(&t)
            .unwrap()
            .contains(value.rsplit('.').next().unwrap()));
        db.create(&t, Note::new("created")).unwrap();
        let ok = authenticate(&db, Some(&format!("Bearer {value}"))).unwrap();
        assert_eq!(ok.meta.id, t.meta.id);
        let mut wrong = value.clone();
        wrong.pop();
        wrong.push('x');
        for bad in [
            None,
            Some(value.clone()),
            Some(format!("Bearer {wrong}")),
            Some("Bearer kiln.ops.abc".to_string()),
            Some(format!("Bearer kiln.{}.", t.meta.id)),
            Some("Bearer ".to_string()),
        ] {
            let e = authenticate(&db, bad.as_deref()).unwrap_err();
            assert_eq!(e.status, 401, "{bad:?}");
        }
        db.delete::<Token>(&t.meta.id, None, |_| Ok(())).unwrap();
        assert!(authenticate(&db, Some(&format!("Bearer {value}"))).is_err());
    }

    #[test]
    fn readers_only_read() {
        use axum::http::Method;
        authorize(Role::Reader, &Method::GET).unwrap();
        assert_eq!(
            authorize(Role::Reader, &Method::POST).unwrap_err().status,
            403
        );
        authorize(Role::Admin, &Method::DELETE).unwrap();
    }
}
