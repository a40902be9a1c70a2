//! Every volume's data-encryption key: made at create, wrapped by the
//! node's KEK in the database (`<id>`, and `<id>/next` during a rekey),
//! and unwrapped only to attach the volume in this node's store.

use kiln_store::crypt::VolumeKey;
use kiln_store::proto::Request;

use crate::db::Db;
use crate::error::ApiError;
use crate::model::Volume;
use crate::trust::secret::Secret;
use crate::trust::{Trust, TrustError};

/// The database key of a volume's next key during a rekey.
pub fn next_slot(id: &str) -> String {
    format!("{id}/next")
}

/// The volume id a database key belongs to.
pub fn volume_of(slot: &str) -> &str {
    slot.strip_suffix("/next").unwrap_or(slot)
}

pub fn store_key(dek: &Secret<64>) -> Result<VolumeKey, ApiError> {
    VolumeKey::from_bytes(dek.expose()).map_err(ApiError::internal)
}

fn locked(v: &Volume, e: TrustError) -> ApiError {
    match e {
        TrustError::Locked(reason) => ApiError::conflict(format!(
            "volume {} is encrypted and this node's keys are locked: {reason}",
            v.meta.name
        )),
        e => ApiError::from(e),
    }
}

/// A new key for a new volume, stored wrapped before the store sees it.
pub fn create(db: &Db, trust: &Trust, v: &Volume) -> Result<VolumeKey, ApiError> {
    let (dek, w) = trust.new_volume_key(&v.meta.id).map_err(|e| locked(v, e))?;
    db.set_volume_keys(&[(v.meta.id.clone(), Some(w))])?;
    store_key(&dek)
}

/// A clone shares its parent's key: the same DEK, wrapped for the clone.
pub fn share(db: &Db, trust: &Trust, parent: &Volume, clone: &Volume) -> Result<(), ApiError> {
    let Some(w) = db.volume_key(&parent.meta.id)? else {
        return Ok(());
    };
    let dek = trust
        .volume_key(&parent.meta.id, &w)
        .map_err(|e| locked(parent, e))?;
    let w = trust
        .wrap_volume_key(&clone.meta.id, &dek)
        .map_err(|e| locked(clone, e))?;
    db.set_volume_keys(&[(clone.meta.id.clone(), Some(w))])?;
    Ok(())
}

/// The request that makes this node the volume's writer, with its keys.
pub fn attach_request(db: &Db, trust: &Trust, v: &Volume) -> Result<Request, ApiError> {
    let unwrap = |slot: &str| -> Result<Option<VolumeKey>, ApiError> {
        match db.volume_key(slot)? {
            None => Ok(None),
            Some(w) => {
                let dek = trust.volume_key(&v.meta.id, &w).map_err(|e| locked(v, e))?;
                Ok(Some(store_key(&dek)?))
            }
        }
    };
    Ok(Request::VolAttach {
        name: v.meta.name.clone(),
        force: false,
        key: unwrap(&v.meta.id)?,
        next_key: unwrap(&next_slot(&v.meta.id))?,
    })
}

/// Forgets a deleted volume's keys: its data on any disk left behind is
/// unreadable from now on.
pub fn forget(db: &Db, id: &str) -> Result<(), ApiError> {
    db.set_volume_keys(&[(id.to_string(), None), (next_slot(id), None)])?;
    Ok(())
}
