//! The agent's state: resources, their name index and the event log, in
//! one redb database. Every change of a resource and the event that
//! records it commit in one transaction, so the log never misses a change
//! and never holds one that did not happen.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::model::{now, Event, Kind, Resource};
use crate::trust::wrap::Wrapped;

/// `kind/id` -> resource JSON.
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// `kind/name` -> id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
/// seq -> event JSON.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Counters (`event_seq`).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Volume id -> its data-encryption key wrapped by the node's KEK (JSON of
/// `trust::wrap::Wrapped`; never a key in the clear). Kept out of the
/// volume resource so that no API answer carries it.
const VOLUME_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("volume_keys");

/// How many events are kept; older ones are dropped.
pub const EVENTS_KEPT: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no {} {key:?}", kind.as_str())]
    NotFound { kind: Kind, key: String },
    #[error("a {} named {name:?} exists", kind.as_str())]
    NameTaken { kind: Kind, name: String },
    #[error("generation {expected} is stale (now {actual})")]
    Stale { expected: u64, actual: u64 },
    #[error("{0}")]
    Rejected(ApiError),
    #[error("state database: {0}")]
    Storage(String),
}

impl DbError {
    fn storage(e: impl std::fmt::Display) -> Self {
        DbError::Storage(e.to_string())
    }
}

impl From<ApiError> for DbError {
    fn from(e: ApiError) -> Self {
        DbError::Rejected(e)
    }
}

macro_rules! storage {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self { DbError::storage(e) }
        }
    )*};
}
storage!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// What an event says beyond the resource's own identity and state.
pub struct Note {
    pub action: &'static str,
    pub message: Option<String>,
}

impl Note {
    pub fn new(action: &'static str) -> Note {
        Note {
            action,
            message: None,
        }
    }
    pub fn with(action: &'static str, message: impl Into<String>) -> Note {
        Note {
            action,
            message: Some(message.into()),
        }
    }
}

/// How an update treats the resource's generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// Desired state changes: generation + 1, checked against `expected`.
    Desired { expected: Option<u64> },
    /// Observed state only: generation unchanged.
    Observed,
}

pub struct Db {
    db: Database,
    events: broadcast::Sender<Event>,
}

fn res_key(kind: Kind, id: &str) -> String {
    format!("{}/{id}", kind.as_str())
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(RESOURCES)?;
        tx.open_table(NAMES)?;
        tx.open_table(EVENTS)?;
        tx.open_table(COUNTERS)?;
        tx.open_table(VOLUME_KEYS)?;
        tx.commit()?;
        let (events, _) = broadcast::channel(1024);
        Ok(Db { db, events })
    }

    /// A volume's wrapped key, if it has one.
    pub fn volume_key(&self, id: &str) -> Result<Option<Wrapped>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUME_KEYS)?;
        let v = t.get(id)?;
        Ok(match v {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    /// Stores (or, with `None`, forgets) wrapped volume keys, all in one
    /// transaction: a KEK rotation re-wraps every key or none.
    pub fn set_volume_keys(&self, keys: &[(String, Option<Wrapped>)]) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(VOLUME_KEYS)?;
            for (id, w) in keys {
                match w {
                    Some(w) => {
                        t.insert(id.as_str(), serde_json::to_vec(w)?.as_slice())?;
                    }
                    None => {
                        t.remove(id.as_str())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every wrapped volume key, by volume id.
    pub fn volume_keys(&self) -> Result<Vec<(String, Wrapped)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUME_KEYS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    /// Events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Finds a resource by id or by name.
    pub fn get<T: Resource>(&self, key: &str) -> Result<T, DbError> {
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        let resources = tx.open_table(RESOURCES)?;
        let id = match names.get(res_key(T::KIND, key).as_str())? {
            Some(id) => id.value().to_string(),
            None => key.to_string(),
        };
        match resources.get(res_key(T::KIND, &id).as_str())? {
            Some(v) => Ok(serde_json::from_slice(v.value())?),
            None => Err(DbError::NotFound {
                kind: T::KIND,
                key: key.to_string(),
            }),
        }
    }

    /// Every resource of a kind, by name.
    pub fn list<T: Resource>(&self) -> Result<Vec<T>, DbError> {
        let tx = self.db.begin_read()?;
        let resources = tx.open_table(RESOURCES)?;
        let lo = format!("{}/", T::KIND.as_str());
        let hi = format!("{}0", T::KIND.as_str()); // '0' follows '/'
        let mut out: Vec<T> = Vec::new();
        for entry in resources.range(lo.as_str()..hi.as_str())? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value())?);
        }
        out.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
        Ok(out)
    }

    /// Stores a new resource; its name must be free.
    pub fn create<T: Resource>(&self, r: &T, note: Note) -> Result<Event, DbError> {
        let tx = self.db.begin_write()?;
        let event;
        {
            let mut names = tx.open_table(NAMES)?;
            let mut resources = tx.open_table(RESOURCES)?;
            let name_key = res_key(T::KIND, &r.meta().name);
            if names.get(name_key.as_str())?.is_some() {
                return Err(DbError::NameTaken {
                    kind: T::KIND,
                    name: r.meta().name.clone(),
                });
            }
            names.insert(name_key.as_str(), r.meta().id.as_str())?;
            let bytes = serde_json::to_vec(r)?;
            resources.insert(res_key(T::KIND, &r.meta().id).as_str(), bytes.as_slice())?;
            event = Self::append_event(&tx, r, note)?;
        }
        tx.commit()?;
        let _ = self.events.send(event.clone());
        Ok(event)
    }

    /// Changes a resource under `f`, which sees the current value and may
    /// refuse (nothing is then written). Returns the new value.
    pub fn update<T: Resource>(
        &self,
        key: &str,
        change: Change,
        f: impl FnOnce(&mut T) -> Result<Option<Note>, ApiError>,
    ) -> Result<T, DbError> {
        let tx = self.db.begin_write()?;
        let (value, event) = {
            let names = tx.open_table(NAMES)?;
            let mut resources = tx.open_table(RESOURCES)?;
            let id = match names.get(res_key(T::KIND, key).as_str())? {
                Some(id) => id.value().to_string(),
                None => key.to_string(),
            };
            let rkey = res_key(T::KIND, &id);
            let mut value: T = match resources.get(rkey.as_str())? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => {
                    return Err(DbError::NotFound {
                        kind: T::KIND,
                        key: key.to_string(),
                    })
                }
            };
            let before = serde_json::to_vec(&value)?;
            if let Change::Desired {
                expected: Some(expected),
            } = change
            {
                let actual = value.meta().generation;
                if expected != actual {
                    return Err(DbError::Stale { expected, actual });
                }
            }
            let note = f(&mut value)?;
            let after = serde_json::to_vec(&value)?;
            if before == after && note.is_none() {
                return Ok(value);
            }
            if before != after {
                let m = value.meta_mut();
                m.updated_at = now();
                if matches!(change, Change::Desired { .. }) {
                    m.generation += 1;
                }
            }
            let bytes = serde_json::to_vec(&value)?;
            resources.insert(rkey.as_str(), bytes.as_slice())?;
            drop(names);
            let event = match note {
                Some(note) => Some(Self::append_event(&tx, &value, note)?),
                None => None,
            };
            (value, event)
        };
        tx.commit()?;
        if let Some(e) = event {
            let _ = self.events.send(e);
        }
        Ok(value)
    }

    /// Removes a resource, checking `expected` generation if given.
    pub fn delete<T: Resource>(
        &self,
        key: &str,
        expected: Option<u64>,
        check: impl FnOnce(&T) -> Result<(), ApiError>,
    ) -> Result<T, DbError> {
        let tx = self.db.begin_write()?;
        let (value, event) = {
            let mut names = tx.open_table(NAMES)?;
            let mut resources = tx.open_table(RESOURCES)?;
            let id = match names.get(res_key(T::KIND, key).as_str())? {
                Some(id) => id.value().to_string(),
                None => key.to_string(),
            };
            let rkey = res_key(T::KIND, &id);
            let value: T = match resources.get(rkey.as_str())? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => {
                    return Err(DbError::NotFound {
                        kind: T::KIND,
                        key: key.to_string(),
                    })
                }
            };
            if let Some(expected) = expected {
                let actual = value.meta().generation;
                if expected != actual {
                    return Err(DbError::Stale { expected, actual });
                }
            }
            check(&value)?;
            resources.remove(rkey.as_str())?;
            names.remove(res_key(T::KIND, &value.meta().name).as_str())?;
            drop((names, resources));
            let event = Self::append_event(&tx, &value, Note::new("deleted"))?;
            (value, event)
        };
        tx.commit()?;
        let _ = self.events.send(event);
        Ok(value)
    }

    fn append_event<T: Resource>(
        tx: &redb::WriteTransaction,
        r: &T,
        note: Note,
    ) -> Result<Event, DbError> {
        let state = if note.action == "deleted" {
            "deleted".to_string()
        } else {
            r.state()
        };
        let event = Event {
            seq: 0,
            time: now(),
            kind: T::KIND,
            id: r.meta().id.clone(),
            name: r.meta().name.clone(),
            action: note.action.to_string(),
            state,
            generation: r.meta().generation,
            message: note.message,
        };
        Self::append(tx, event)
    }

    /// An event about the node itself (not a stored resource), such as its
    /// store daemon going away and coming back.
    pub fn node_event(
        &self,
        node: &crate::model::NodeInfo,
        state: &str,
        note: Note,
    ) -> Result<Event, DbError> {
        let tx = self.db.begin_write()?;
        let event = Self::append(
            &tx,
            Event {
                seq: 0,
                time: now(),
                kind: Kind::Node,
                id: node.id.clone(),
                name: node.name.clone(),
                action: note.action.to_string(),
                state: state.to_string(),
                generation: 0,
                message: note.message,
            },
        )?;
        tx.commit()?;
        let _ = self.events.send(event.clone());
        Ok(event)
    }

    /// Gives `event` the next sequence number and keeps it (and no more
    /// than [`EVENTS_KEPT`] events).
    fn append(tx: &redb::WriteTransaction, mut event: Event) -> Result<Event, DbError> {
        let mut counters = tx.open_table(COUNTERS)?;
        let seq = counters.get("event_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
        counters.insert("event_seq", seq)?;
        event.seq = seq;
        let mut events = tx.open_table(EVENTS)?;
        events.insert(seq, serde_json::to_vec(&event)?.as_slice())?;
        if seq > EVENTS_KEPT {
            events.remove(seq - EVENTS_KEPT)?;
        }
        Ok(event)
    }

    /// Events after `since`, oldest first, at most `limit`.
    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>, DbError> {
        let tx = self.db.begin_read()?;
        let events = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in events.range(since.saturating_add(1)..)? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The newest event's sequence number (0 before the first).
    pub fn last_seq(&self) -> Result<u64, DbError> {
        let tx = self.db.begin_read()?;
        let counters = tx.open_table(COUNTERS)?;
        Ok(counters.get("event_seq")?.map(|v| v.value()).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn net(name: &str) -> Network {
        Network {
            meta: Meta::new(name),
            spec: NetworkSpec::default(),
            status: NetworkStatus {
                state: NetworkState::Ready,
                bridge: format!("kb-{name}"),
                reason: None,
            },
        }
    }

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s.redb")).unwrap();
        (dir, db)
    }

    #[test]
    fn names_are_unique_per_kind_and_found_by_id_or_name() {
        let (_d, db) = db();
        let n = net("lan");
        db.create(&n, Note::new("created")).unwrap();
        assert!(matches!(
            db.create(&net("lan"), Note::new("created")),
            Err(DbError::NameTaken { .. })
        ));
        assert_eq!(db.get::<Network>("lan").unwrap(), n);
        assert_eq!(db.get::<Network>(&n.meta.id).unwrap(), n);
        assert!(matches!(db.get::<Vm>("lan"), Err(DbError::NotFound { .. })));
    }

    #[test]
    fn desired_changes_bump_the_generation_and_stale_ones_are_refused() {
        let (_d, db) = db();
        db.create(&net("lan"), Note::new("created")).unwrap();
        let v: Network = db
            .update(
                "lan",
                Change::Desired { expected: Some(1) },
                |n: &mut Network| {
                    n.spec.vlan = Some(7);
                    Ok(Some(Note::new("updated")))
                },
            )
            .unwrap();
        assert_eq!(v.meta.generation, 2);
        let stale = db.update(
            "lan",
            Change::Desired { expected: Some(1) },
            |n: &mut Network| {
                n.spec.vlan = Some(8);
                Ok(None)
            },
        );
        assert!(matches!(
            stale,
            Err(DbError::Stale {
                expected: 1,
                actual: 2
            })
        ));
        let o: Network = db
            .update("lan", Change::Observed, |n: &mut Network| {
                n.status.reason = Some("x".into());
                Ok(None)
            })
            .unwrap();
        assert_eq!(o.meta.generation, 2);
        assert_eq!(db.get::<Network>("lan").unwrap().spec.vlan, Some(7));
    }

    #[test]
    fn a_refused_change_writes_nothing() {
        let (_d, db) = db();
        db.create(&net("lan"), Note::new("created")).unwrap();
        let seq = db.last_seq().unwrap();
        let r = db.update(
            "lan",
            Change::Desired { expected: None },
            |n: &mut Network| {
                n.spec.vlan = Some(9);
                Err(ApiError::conflict("no"))
            },
        );
        assert!(matches!(r, Err(DbError::Rejected(_))));
        assert_eq!(db.get::<Network>("lan").unwrap().spec.vlan, None);
        assert_eq!(db.last_seq().unwrap(), seq);
    }

    #[test]
    fn events_resume_after_a_sequence_number_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let db = Db::open(&path).unwrap();
            for i in 0..5 {
                db.create(&net(&format!("n{i}")), Note::new("created"))
                    .unwrap();
            }
            db.delete::<Network>("n0", None, |_| Ok(())).unwrap();
        }
        let db = Db::open(&path).unwrap();
        let all = db.events_since(0, 100).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6]
        );
        let after = db.events_since(4, 100).unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!(after[1].action, "deleted");
        assert_eq!(db.list::<Network>().unwrap().len(), 4);
        assert!(db.get::<Network>("n0").is_err());
    }
}
