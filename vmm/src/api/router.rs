//! Maps one request to one [`VmmControl`] call and its response. No I/O here: the table of
//! endpoints is tested without a socket.

use super::http::{Response, PROMETHEUS_TEXT};
use super::metrics::render_metrics;
use super::types::PmemList;
use super::{error_chain, ApiError, VmmControl};

/// The endpoints, parsed from a path. Method checks come after, so a known path with the
/// wrong method is a 405 and an unknown path a 404.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint<'a> {
    Vm,
    VmAction(VmAction),
    PmemList,
    Pmem(&'a str),
    PmemFlush(&'a str),
    PmemCrash(&'a str),
    Metrics,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum VmAction {
    Pause,
    Resume,
    Shutdown,
    PowerCut,
}

impl<'a> Endpoint<'a> {
    fn parse(path: &'a str) -> Option<Endpoint<'a>> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        Some(match segments.as_slice() {
            ["v1", "vm"] => Endpoint::Vm,
            ["v1", "vm", "pause"] => Endpoint::VmAction(VmAction::Pause),
            ["v1", "vm", "resume"] => Endpoint::VmAction(VmAction::Resume),
            ["v1", "vm", "shutdown"] => Endpoint::VmAction(VmAction::Shutdown),
            ["v1", "vm", "power-cut"] => Endpoint::VmAction(VmAction::PowerCut),
            ["v1", "pmem"] => Endpoint::PmemList,
            ["v1", "pmem", id] if !id.is_empty() => Endpoint::Pmem(id),
            ["v1", "pmem", id, "flush"] if !id.is_empty() => Endpoint::PmemFlush(id),
            ["v1", "pmem", id, "crash"] if !id.is_empty() => Endpoint::PmemCrash(id),
            ["metrics"] => Endpoint::Metrics,
            _ => return None,
        })
    }

    fn method(&self) -> &'static str {
        match self {
            Endpoint::Vm | Endpoint::PmemList | Endpoint::Pmem(_) | Endpoint::Metrics => "GET",
            Endpoint::VmAction(_) | Endpoint::PmemFlush(_) | Endpoint::PmemCrash(_) => "PUT",
        }
    }
}

/// Answers one request. Never panics on its input: everything a client can send maps to a
/// status.
pub fn route(ctl: &dyn VmmControl, method: &str, path: &str, body: &[u8]) -> Response {
    let Some(endpoint) = Endpoint::parse(path) else {
        return Response::error(404, &format!("no endpoint at {path:?}; see docs/api.md"));
    };
    let allowed = endpoint.method();
    if method != allowed {
        return Response::error(405, &format!("{path} accepts {allowed}, not {method:?}"))
            .with_allow(allowed);
    }
    if let Err(msg) = check_body(method, body) {
        return Response::error(400, &msg);
    }
    match endpoint {
        Endpoint::Vm => Response::json(200, &ctl.vm_info()),
        Endpoint::PmemList => Response::json(
            200,
            &PmemList {
                devices: ctl.pmem_list(),
            },
        ),
        Endpoint::Pmem(raw) => match percent_decode(raw) {
            Err(msg) => Response::error(400, &msg),
            Ok(id) => match ctl.pmem_info(&id) {
                Some(info) => Response::json(200, &info),
                None => api_error(&ApiError::NoSuchDevice { id }),
            },
        },
        Endpoint::PmemFlush(raw) => match percent_decode(raw) {
            Err(msg) => Response::error(400, &msg),
            Ok(id) => match ctl.pmem_flush(&id) {
                Ok(report) => Response::json(200, &report),
                Err(e) => api_error(&e),
            },
        },
        Endpoint::PmemCrash(raw) => match percent_decode(raw) {
            Err(msg) => Response::error(400, &msg),
            Ok(id) => match ctl.pmem_crash(&id) {
                Ok(()) => Response::no_content(),
                Err(e) => api_error(&e),
            },
        },
        Endpoint::VmAction(action) => {
            let result = match action {
                VmAction::Pause => ctl.pause(),
                VmAction::Resume => ctl.resume(),
                VmAction::Shutdown => ctl.shutdown(),
                VmAction::PowerCut => ctl.power_cut(),
            };
            match result {
                Ok(()) => Response::no_content(),
                Err(e) => api_error(&e),
            }
        }
        Endpoint::Metrics => Response::text(
            200,
            PROMETHEUS_TEXT,
            render_metrics(&ctl.vm_info(), &ctl.pmem_list()),
        ),
    }
}

/// GETs take no body. A PUT takes none, or `{}`: its actions have no options yet, and a
/// body that is not `{}` is more likely a mistake than something to ignore.
fn check_body(method: &str, body: &[u8]) -> Result<(), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    if method == "GET" {
        return Err(format!("GET takes no body; got {} bytes", body.len()));
    }
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| format!("invalid JSON body (expected {{}} or nothing): {e}"))?;
    match object.keys().next() {
        Some(key) => Err(format!(
            "unknown field {key:?} in the body; this action takes no options"
        )),
        None => Ok(()),
    }
}

/// Decodes `%XX` escapes in a device id segment, as the client sends ids it cannot put in a
/// path verbatim.
fn percent_decode(segment: &str) -> Result<String, String> {
    let bad = || format!("path segment {segment:?} has invalid percent-encoding");
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(bad());
            }
            // Two hex digits always fit a byte.
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn api_error(e: &ApiError) -> Response {
    Response::error(e.status_code(), &error_chain(e))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::fake::FakeVmm;
    use super::super::types::VmState;
    use super::*;

    fn body_json(r: &Response) -> Value {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
    }

    #[test]
    fn endpoint_table() {
        // (method, path, body, status, Allow, a JSON pointer and the value it must hold)
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            u16,
            Option<&'static str>,
            &'static str,
            Value,
        );
        let cases: Vec<Case> = vec![
            ("GET", "/v1/vm", "", 200, None, "/state", "running".into()),
            ("GET", "/v1/vm", "", 200, None, "/vcpus", 2.into()),
            (
                "GET",
                "/v1/pmem",
                "",
                200,
                None,
                "/devices/1/id",
                "pmem1".into(),
            ),
            (
                "GET",
                "/v1/pmem",
                "",
                200,
                None,
                "/devices/0/stats/flushes",
                3.into(),
            ),
            (
                "GET",
                "/v1/pmem",
                " \r\n",
                200,
                None,
                "/devices/0/readonly",
                false.into(),
            ),
            (
                "GET",
                "/v1/pmem/pmem1",
                "",
                200,
                None,
                "/readonly",
                true.into(),
            ),
            (
                "GET",
                "/v1/pmem/pmem0",
                "",
                200,
                None,
                "/flush_hint_count",
                2.into(),
            ),
            (
                "GET",
                "/v1/pmem/pmem%30",
                "",
                200,
                None,
                "/id",
                "pmem0".into(),
            ),
            ("GET", "/v1/pmem/%zz", "", 400, None, "", Value::Null),
            ("PUT", "/v1/pmem/%ff/flush", "", 400, None, "", Value::Null),
            ("PUT", "/v1/pmem/a%2/flush", "", 400, None, "", Value::Null),
            ("PUT", "/v1/pmem/%+1/flush", "", 400, None, "", Value::Null),
            (
                "GET",
                "/v1/pmem/nope",
                "",
                404,
                None,
                "/error",
                "no pmem device with id \"nope\" (GET /v1/pmem lists them)".into(),
            ),
            ("GET", "/v1/pmem/", "", 404, None, "", Value::Null),
            ("GET", "/v1/pmem//flush", "", 404, None, "", Value::Null),
            ("GET", "/v1/vm/", "", 404, None, "", Value::Null),
            ("GET", "/", "", 404, None, "", Value::Null),
            ("GET", "v1/vm", "", 404, None, "", Value::Null),
            ("GET", "/v2/vm", "", 404, None, "", Value::Null),
            ("PUT", "/v1/vm", "", 405, Some("GET"), "", Value::Null),
            ("POST", "/v1/pmem", "", 405, Some("GET"), "", Value::Null),
            (
                "DELETE",
                "/v1/pmem/pmem0",
                "",
                405,
                Some("GET"),
                "",
                Value::Null,
            ),
            ("GET", "/v1/vm/pause", "", 405, Some("PUT"), "", Value::Null),
            ("HEAD", "/metrics", "", 405, Some("GET"), "", Value::Null),
            ("get", "/v1/vm", "", 405, Some("GET"), "", Value::Null),
            (
                "GET",
                "/v1/vm",
                "{}",
                400,
                None,
                "/error",
                "GET takes no body; got 2 bytes".into(),
            ),
            (
                "PUT",
                "/v1/pmem/pmem0/flush",
                "",
                200,
                None,
                "/pages",
                4.into(),
            ),
            (
                "PUT",
                "/v1/pmem/pmem0/flush",
                "{}",
                200,
                None,
                "/bytes",
                16384.into(),
            ),
            (
                "PUT",
                "/v1/pmem/pmem0/flush",
                "{",
                400,
                None,
                "",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/pmem/pmem0/flush",
                "{\"fsync\":1}",
                400,
                None,
                "/error",
                "unknown field \"fsync\" in the body; this action takes no options".into(),
            ),
            (
                "PUT",
                "/v1/pmem/pmem0/flush",
                "[]",
                400,
                None,
                "",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/pmem/ghost/flush",
                "",
                404,
                None,
                "",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/pmem/broken/flush",
                "",
                500,
                None,
                "/error",
                "writeback of broken failed: Input/output error".into(),
            ),
            (
                "PUT",
                "/v1/vm/resume",
                "",
                409,
                None,
                "/error",
                "cannot resume the VM while it is running".into(),
            ),
            ("PUT", "/v1/vm/pause", "{}", 204, None, "", Value::Null),
            ("PUT", "/v1/vm/power-cut", "", 204, None, "", Value::Null),
            (
                "GET",
                "/v1/vm/power-cut",
                "",
                405,
                Some("PUT"),
                "",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/pmem/pmem1/crash",
                "",
                204,
                None,
                "",
                Value::Null,
            ),
            (
                "GET",
                "/v1/pmem/pmem1/crash",
                "",
                405,
                Some("PUT"),
                "",
                Value::Null,
            ),
            (
                "PUT",
                "/v1/pmem/ghost/crash",
                "",
                404,
                None,
                "/error",
                "no pmem device with id \"ghost\" (GET /v1/pmem lists them)".into(),
            ),
            ("PUT", "/v1/pmem/%zz/crash", "", 400, None, "", Value::Null),
        ];
        for (method, path, body, status, allow, pointer, want) in cases {
            let fake = FakeVmm::new();
            let r = route(&fake, method, path, body.as_bytes());
            let what = format!(
                "{method} {path} {body:?}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.status, status, "{what}");
            assert_eq!(r.allow, allow, "{what}");
            if status == 204 {
                assert!(r.body.is_empty(), "{what}");
                continue;
            }
            assert_eq!(r.content_type, "application/json", "{what}");
            let json = body_json(&r);
            if status >= 400 {
                assert!(
                    json["error"].as_str().is_some_and(|s| !s.is_empty()),
                    "{what}"
                );
            }
            if !pointer.is_empty() {
                assert_eq!(json.pointer(pointer), Some(&want), "{what}");
            }
        }
    }

    #[test]
    fn actions_reach_the_vmm_and_conflicts_are_409() {
        let fake = FakeVmm::new();
        assert_eq!(route(&fake, "PUT", "/v1/vm/pause", b"").status, 204);
        assert_eq!(fake.vm_info().state, VmState::Paused);
        let again = route(&fake, "PUT", "/v1/vm/pause", b"");
        assert_eq!(again.status, 409);
        assert_eq!(
            body_json(&again)["error"],
            "cannot pause the VM while it is paused"
        );
        assert_eq!(route(&fake, "PUT", "/v1/vm/resume", b"").status, 204);
        assert_eq!(route(&fake, "PUT", "/v1/vm/shutdown", b"").status, 204);
        assert_eq!(fake.vm_info().state, VmState::ShuttingDown);
        assert_eq!(route(&fake, "PUT", "/v1/vm/pause", b"").status, 409);
        assert_eq!(route(&fake, "PUT", "/v1/vm/shutdown", b"").status, 409);
    }

    #[test]
    fn a_power_cut_ends_the_vm_once() {
        let fake = FakeVmm::new();
        assert_eq!(route(&fake, "PUT", "/v1/pmem/pmem0/crash", b"").status, 204);
        assert_eq!(fake.vm_info().state, VmState::ShuttingDown);
        let again = route(&fake, "PUT", "/v1/vm/power-cut", b"");
        assert_eq!(again.status, 409);
        assert_eq!(
            body_json(&again)["error"],
            "cannot cut the power of the VM while it is shutting_down"
        );
        assert_eq!(route(&fake, "PUT", "/v1/vm/shutdown", b"").status, 409);
    }

    #[test]
    fn a_host_flush_shows_up_in_the_stats() {
        let fake = FakeVmm::new();
        assert_eq!(route(&fake, "PUT", "/v1/pmem/pmem0/flush", b"").status, 200);
        let r = route(&fake, "GET", "/v1/pmem/pmem0", b"");
        assert_eq!(body_json(&r)["stats"]["host_flushes"], 1);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let fake = FakeVmm::new();
        let r = route(&fake, "GET", "/metrics", b"");
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
        let text = String::from_utf8(r.body).unwrap();
        assert!(
            text.contains("pmvm_pmem_flushes_total{id=\"pmem0\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn odd_paths_and_methods_never_panic() {
        let fake = FakeVmm::new();
        for path in [
            "",
            "/",
            "//",
            "/v1/pmem/\u{0}",
            "/v1/pmem/%2F/flush",
            "/metrics/",
            "/v1/pmem/a/b/c/d",
        ] {
            for method in ["GET", "PUT", "", "\u{fffd}"] {
                let r = route(&fake, method, path, b"\xff\xfe");
                assert!(
                    (400..500).contains(&r.status),
                    "{method} {path}: {}",
                    r.status
                );
            }
        }
    }
}
