//! The OpenAPI 3 document, generated from the handlers and types; served at
//! `/v1/openapi.json` and committed as `host-agent/openapi.json` (a test
//! fails when they drift: `kiln-agent openapi > host-agent/openapi.json`).

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::AppState;
use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(title = "Kiln host agent", description = "One Kiln node's images, networks, volumes, VMs, tokens and events."),
    paths(
        super::node::get_node,
        super::trust::status, super::trust::attestation, super::trust::unlock,
        super::trust::reseal, super::trust::rotate_kek,
        super::trust::get_policy, super::trust::put_policy,
        super::metrics::metrics,
        super::tokens::list, super::tokens::create, super::tokens::revoke,
        super::images::list, super::images::get_one, super::images::create, super::images::remove,
        super::images::upload,
        super::networks::list, super::networks::get_one, super::networks::create, super::networks::remove,
        super::volumes::list, super::volumes::get_one, super::volumes::create, super::volumes::remove,
        super::volumes::resize, super::volumes::snapshot, super::volumes::delete_snapshot,
        super::volumes::rekey,
        super::vms::list, super::vms::get_one, super::vms::create, super::vms::update, super::vms::remove,
        super::vms::start, super::vms::shutdown, super::vms::power_off, super::vms::pause,
        super::vms::resume, super::vms::restart,
        super::console::read, super::console::attach,
        super::events::list, super::events::stream,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Common),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// Adds the bearer scheme and the error responses every operation can give.
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let errors = [
            ("400", "Malformed request"),
            ("401", "No valid token"),
            ("403", "The token may not do this"),
            ("404", "No such resource or endpoint"),
            ("405", "Method not allowed"),
            (
                "409",
                "Conflicts with the resource's state or generation, or the name is taken",
            ),
            ("413", "Body too large"),
            ("415", "Body is not JSON"),
            ("422", "Invalid values"),
            ("428", "The generation is required"),
            ("500", "Internal error"),
        ];
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                for (code, desc) in errors {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| RefOr::T(error_response(desc)));
                }
            }
        }
    }
}

fn error_response(desc: &str) -> Response {
    ResponseBuilder::new()
        .description(desc)
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The document as the agent serves it.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default() + "\n"
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This API's OpenAPI 3 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "node", operation_id = "openapi.get",
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Json<serde_json::Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}
