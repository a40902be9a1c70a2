//! The image policy (the Secure Boot / shielded-VM analogue): which
//! kernels, initrds and disk images a VM may start from, and what each
//! launch was made of, for the launch measurement.

use crate::db::{Db, DbError, Note};
use crate::model::{
    FileRole, Image, ImagePolicy, ImagePolicySpec, ImagePolicyStatus, Meta, PolicyState, Volume,
    VolumeSource, IMAGE_POLICY,
};

/// The node's policy; made (audit mode, nothing approved) when missing.
pub fn current(db: &Db) -> Result<ImagePolicy, DbError> {
    match db.get::<ImagePolicy>(IMAGE_POLICY) {
        Ok(p) => Ok(p),
        Err(DbError::NotFound { .. }) => {
            let p = ImagePolicy {
                meta: Meta::new(IMAGE_POLICY),
                spec: ImagePolicySpec::default(),
                status: ImagePolicyStatus {
                    state: PolicyState::Active,
                },
            };
            match db.create(
                &p,
                Note::with("created", "image policy (audit mode, nothing approved)"),
            ) {
                Ok(_) | Err(DbError::NameTaken { .. }) => db.get(IMAGE_POLICY),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// One file a VM starts from.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// For people: "kernel of image debian (sha256 ab12…)".
    pub what: String,
    pub sha256: String,
}

/// The kernel and initrd of the boot image.
pub fn boot_sources(image: &Image) -> Vec<Source> {
    [FileRole::Kernel, FileRole::Initrd]
        .into_iter()
        .filter_map(|role| image.file(role))
        .map(|f| Source {
            what: format!("{} of image {}", f.role, image.meta.name),
            sha256: f.sha256.clone(),
        })
        .collect()
}

/// How a volume's data began: the disk image it was copied from (through
/// any chain of snapshot clones), or `None` for a blank volume. An image
/// that no longer exists is named with an unknown digest, which no
/// policy approves.
pub fn base_image(db: &Db, volume: &Volume) -> Option<Source> {
    let mut v = volume.clone();
    for _ in 0..32 {
        match &v.spec.source {
            VolumeSource::Blank => return None,
            VolumeSource::Image { image } => {
                return Some(match db.get::<Image>(image) {
                    Ok(img) => match img.file(FileRole::Disk) {
                        Some(f) => Source {
                            what: format!(
                                "disk image {} (base of volume {})",
                                img.meta.name, volume.meta.name
                            ),
                            sha256: f.sha256.clone(),
                        },
                        None => Source {
                            what: format!(
                                "image {} (base of volume {}) has no disk file",
                                img.meta.name, volume.meta.name
                            ),
                            sha256: "unknown".into(),
                        },
                    },
                    Err(_) => Source {
                        what: format!(
                            "image {image:?} (base of volume {}), since deleted",
                            volume.meta.name
                        ),
                        sha256: "unknown".into(),
                    },
                });
            }
            VolumeSource::Snapshot { volume: parent, .. } => match db.get::<Volume>(parent) {
                Ok(p) => v = p,
                Err(_) => {
                    return Some(Source {
                        what: format!(
                            "volume {parent:?} (parent of volume {}), since deleted",
                            volume.meta.name
                        ),
                        sha256: "unknown".into(),
                    })
                }
            },
        }
    }
    Some(Source {
        what: format!(
            "volume {}: clone chain too long to follow",
            volume.meta.name
        ),
        sha256: "unknown".into(),
    })
}

/// The sources the policy does not approve, as one line each.
pub fn unapproved(policy: &ImagePolicySpec, sources: &[Source]) -> Vec<String> {
    sources
        .iter()
        .filter(|s| !policy.approved.iter().any(|a| a.sha256 == s.sha256))
        .map(|s| format!("{} (sha256 {}) is not approved", s.what, s.sha256))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ApprovedDigest;

    #[test]
    fn only_listed_digests_are_approved() {
        let spec = ImagePolicySpec {
            mode: crate::model::PolicyMode::Enforce,
            approved: vec![ApprovedDigest {
                sha256: "aa".into(),
                note: None,
            }],
        };
        let s = |w: &str, d: &str| Source {
            what: w.into(),
            sha256: d.into(),
        };
        assert!(unapproved(&spec, &[s("kernel", "aa")]).is_empty());
        assert_eq!(
            unapproved(
                &spec,
                &[s("kernel", "aa"), s("initrd", "bb"), s("gone", "unknown")]
            ),
            vec![
                "initrd (sha256 bb) is not approved".to_string(),
                "gone (sha256 unknown) is not approved".to_string()
            ]
        );
    }
}
