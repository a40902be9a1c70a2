//! `/metrics`: Prometheus text. Per VM: vCPU time, memory, and each
//! device's counters as kiln-vmm reports them; the agent's own health.

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
use crate::model::{Image, Network, Vm, VmState};
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
    for state in [
        "stopped", "starting", "running", "stopping", "paused", "failed",
    ] {
        let n = vms
            .iter()
            .filter(|v| {
                serde_json::to_value(v.status.state)
                    .ok()
                    .and_then(|s| s.as_str().map(|s| s == state))
                    == Some(true)
            })
            .count();
        vms_by_state
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .set(n as i64);
    }
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
