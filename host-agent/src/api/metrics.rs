//! `/metrics`: Prometheus text. Per VM: vCPU time, memory, and each
//! device's counters as kiln-vmm reports them; per volume: its state, size
//! and each replica's health as kiln-store reports them; the agent's and
//! the store daemon's own health.

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::AppState;
use crate::error::ApiError;
use crate::model::{Image, Network, Vm, VmState, Volume};
use crate::vmm_client;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

type Labels = Vec<(String, String)>;

fn gauge_family() -> Family<Labels, Gauge<f64, AtomicU64>> {
    Family::default()
}

/// Prometheus metrics of the node and its VMs.
#[utoipa::path(get, path = "/metrics", tag = "node", operation_id = "metrics.get",
    responses((status = 200, content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut reg = Registry::with_prefix("kiln");
    let up = Gauge::<i64>::default();
    up.set(1);
    reg.register("agent_up", "The agent answers", up);
    let vms_by_state = Family::<Labels, Gauge>::default();
    let vcpu = gauge_family();
    let mem = gauge_family();
    let dev = gauge_family();
    let uptime = gauge_family();
    let vms = st.db.list::<Vm>()?;
    count_by_state(
        &vms_by_state,
        &[
            "stopped", "starting", "running", "stopping", "paused", "failed",
        ],
        vms.iter().map(|v| v.status.state),
    );
    for vm in vms
        .iter()
        .filter(|v| matches!(v.status.state, VmState::Running | VmState::Paused))
    {
        let l = vec![("vm".to_string(), vm.meta.name.clone())];
        mem.get_or_create(&l).set((vm.spec.memory_mib << 20) as f64);
        let Ok(info) = vmm_client::info(&st.sup.api_socket(&vm.meta.id)).await else {
            continue;
        };
        vcpu.get_or_create(&l).set(info.vcpu_time_ns as f64 / 1e9);
        uptime.get_or_create(&l).set(info.uptime_ms as f64 / 1e3);
        for d in &info.devices {
            let Some(obj) = d.as_object() else { continue };
            let id = obj
                .get("id")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            let kind = obj
                .get("kind")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            for (k, v) in obj {
                if let Some(n) = v.as_f64() {
                    dev.get_or_create(&vec![
                        ("vm".to_string(), vm.meta.name.clone()),
                        ("device".to_string(), id.clone()),
                        ("kind".to_string(), kind.clone()),
                        ("counter".to_string(), k.clone()),
                    ])
                    .set(n);
                }
            }
        }
    }
    reg.register("vms", "VMs by observed state", vms_by_state);
    reg.register("vm_vcpu_seconds", "CPU time used by the VM's vCPUs", vcpu);
    reg.register("vm_memory_bytes", "Guest RAM configured", mem);
    reg.register("vm_uptime_seconds", "Time since kiln-vmm started", uptime);
    reg.register(
        "vm_device_counter",
        "A device counter as kiln-vmm reports it",
        dev,
    );
    volume_metrics(&st, &mut reg).await?;
    let images = Gauge::<i64>::default();
    images.set(st.db.list::<Image>()?.len() as i64);
    reg.register("images", "Images on this node", images);
    let nets = Gauge::<i64>::default();
    nets.set(st.db.list::<Network>()?.len() as i64);
    reg.register("networks", "Networks on this node", nets);
    let seq = Gauge::<i64>::default();
    seq.set(st.db.last_seq()? as i64);
    reg.register("agent_event_seq", "The newest event's sequence number", seq);
    let mut out = String::new();
    encode(&mut out, &reg).map_err(ApiError::internal)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    ))
}

/// One gauge per state name: how many of `states` (serialized as those
/// names) are in it, zeros included.
fn count_by_state<S: serde::Serialize>(
    family: &Family<Labels, Gauge>,
    names: &[&str],
    states: impl Iterator<Item = S>,
) {
    let seen: Vec<String> = states
        .filter_map(|s| serde_json::to_value(s).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for name in names {
        family
            .get_or_create(&vec![("state".to_string(), name.to_string())])
            .set(seen.iter().filter(|s| s == name).count() as i64);
    }
}

/// Volumes by state, and from the store daemon (when it answers): each
/// volume's size, allocation, writer, fencing, checksum and resync
/// counters, and each replica's state.
async fn volume_metrics(st: &AppState, reg: &mut Registry) -> Result<(), ApiError> {
    let volumes = st.db.list::<Volume>()?;
    let by_state = Family::<Labels, Gauge>::default();
    count_by_state(
        &by_state,
        &["creating", "ready", "failed"],
        volumes.iter().map(|v| v.status.state),
    );
    reg.register("volumes", "Volumes by state", by_state);
    let store = st.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(ApiError::internal)?;
    let up = Gauge::<i64>::default();
    up.set(listed.is_ok() as i64);
    reg.register("store_up", "The node's kiln-store daemon answers", up);
    let restarts = Gauge::<i64>::default();
    restarts.set(st.store.restarts.load(std::sync::atomic::Ordering::Relaxed) as i64);
    reg.register(
        "store_restarts",
        "Times the agent started a kiln-store daemon that had gone away",
        restarts,
    );
    let Ok(listed) = listed else {
        return Ok(());
    };
    let per_volume = [
        ("volume_size_bytes", "Volume size"),
        (
            "volume_allocated_bytes",
            "Bytes allocated on this node's replica",
        ),
        ("volume_attached", "This node is the volume's writer"),
        ("volume_fenced", "The volume is fenced on this node"),
        ("volume_epoch", "The volume's writer epoch"),
        (
            "volume_checksum_errors",
            "Checksum mismatches the writer saw",
        ),
        (
            "volume_repaired_blocks",
            "Blocks the writer repaired on a replica",
        ),
        ("volume_resync_bytes", "Bytes copied to resyncing replicas"),
    ];
    let families: Vec<Family<Labels, Gauge>> =
        per_volume.iter().map(|_| Family::default()).collect();
    let replica_up = Family::<Labels, Gauge>::default();
    let replica_dirty = Family::<Labels, Gauge>::default();
    let mut node_checksum = 0;
    for v in listed
        .iter()
        .filter(|v| volumes.iter().any(|x| x.meta.name == v.name))
    {
        let l = vec![("volume".to_string(), v.name.clone())];
        let values = [
            v.size,
            v.allocated_bytes,
            v.attached as u64,
            v.fenced as u64,
            v.epoch,
            v.checksum_errors,
            v.repaired_blocks,
            v.resync_bytes,
        ];
        for (f, x) in families.iter().zip(values) {
            f.get_or_create(&l).set(x as i64);
        }
        for r in &v.replicas {
            let rl = vec![
                ("volume".to_string(), v.name.clone()),
                ("node".to_string(), r.node.clone()),
                ("state".to_string(), r.state.clone()),
            ];
            replica_up.get_or_create(&rl).set(1);
            replica_dirty
                .get_or_create(&vec![
                    ("volume".to_string(), v.name.clone()),
                    ("node".to_string(), r.node.clone()),
                ])
                .set(r.dirty_regions as i64);
        }
        node_checksum = v.node.checksum_errors;
    }
    for ((name, help), f) in per_volume.iter().zip(families) {
        reg.register(*name, *help, f);
    }
    reg.register(
        "volume_replica",
        "A replica of a volume, labelled with its state (in-sync, stale, resyncing, unknown)",
        replica_up,
    );
    reg.register(
        "volume_replica_dirty_regions",
        "Regions a replica still has to resync",
        replica_dirty,
    );
    let c = Gauge::<i64>::default();
    c.set(node_checksum as i64);
    reg.register(
        "store_checksum_errors",
        "Blocks that failed their checksum on this node's store",
        c,
    );
    Ok(())
}
