//! Drivers against real guests and real processes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use avail_driver::process::ProcessDriver;
use avail_driver::wasm::WasmDriver;
use avail_driver::{Driver, HttpRequest, LogSink, StartError, StartSpec};
use avail_model::WorkloadSpec;
use avail_model::agent::InstanceState;

fn spec(json: &str) -> WorkloadSpec {
    let s = WorkloadSpec::parse(json).unwrap();
    s.validate().unwrap();
    s
}

fn logs() -> (LogSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    (Arc::new(move |s: String| l.lock().unwrap().push(s)), lines)
}

fn get(path: &str) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: Default::default(),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn module(name: &str) -> Arc<[u8]> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
    std::fs::read(root.join(format!("{name}.wasm")))
        .unwrap()
        .into()
}

#[tokio::test]
async fn wasm_runs_guests_and_contains_faults() {
    let d = WasmDriver::new().unwrap();
    let s = spec(&format!(
        r#"{{"name":"f","driver":"wasm","artifact":"{DIGEST}","timeout_ms":200,"resources":{{"memory_mib":8}}}}"#
    ));
    let (sink, lines) = logs();
    let i = d
        .start(StartSpec {
            spec: &s,
            module: Some(module("faulty")),
            files: Default::default(),
            logs: sink,
        })
        .await
        .unwrap();
    assert_eq!(i.handle(get("/count")).await.status, 200);
    assert_eq!(&i.handle(get("/count")).await.body[..], br#"{"count":2}"#);
    assert_eq!(i.handle(get("/trap")).await.status, 500);
    assert_eq!(
        &i.handle(get("/count")).await.body[..],
        br#"{"count":1}"#,
        "re-created after the trap"
    );
    let t = Instant::now();
    assert_eq!(i.handle(get("/spin")).await.status, 504);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "interrupted near its deadline"
    );
    let grow = HttpRequest {
        method: "POST".into(),
        path: "/grow?mib=16".into(),
        headers: vec![],
        body: Default::default(),
    };
    assert_eq!(i.handle(grow).await.status, 500, "memory cap of 8 MiB");
    i.handle(get("/log")).await;
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l == "hello from faulty")
    );
    let st = i.status();
    assert_eq!((st.state, st.restarts), (InstanceState::Running, 3));
    i.stop().await;
    assert_eq!(i.handle(get("/ok")).await.status, 503);
}

#[tokio::test]
async fn wasm_refuses_bad_modules() {
    let d = WasmDriver::new().unwrap();
    let s = spec(&format!(
        r#"{{"name":"f","driver":"wasm","artifact":"{DIGEST}"}}"#
    ));
    for bytes in [&b"not wasm"[..], b"\0asm\x01\0\0\0"] {
        let r = d
            .start(StartSpec {
                spec: &s,
                module: Some(bytes.into()),
                files: Default::default(),
                logs: logs().0,
            })
            .await;
        assert!(matches!(r, Err(StartError::InvalidArtifact(_))));
    }
    // A module that needs more memory than the spec allows cannot be instantiated.
    let tiny = spec(&format!(
        r#"{{"name":"f","driver":"wasm","artifact":"{DIGEST}","resources":{{"memory_mib":1}}}}"#
    ));
    let r = d
        .start(StartSpec {
            spec: &tiny,
            module: Some(module("counter")),
            files: Default::default(),
            logs: logs().0,
        })
        .await;
    assert!(matches!(r, Err(StartError::Start(_))));
}

#[tokio::test]
async fn process_is_proxied_and_gets_its_port() {
    let s = spec(
        r#"{"name":"p","driver":"process","artifact":"python3","args":["-c","import http.server,os,sys\nclass H(http.server.BaseHTTPRequestHandler):\n  def do_GET(self):\n    b=(os.environ['PORT']+' '+sys.argv[1]+' '+self.path).encode()\n    self.send_response(200); self.send_header('content-length',str(len(b))); self.end_headers(); self.wfile.write(b)\n  def log_message(self,*a): pass\nprint('serving', flush=True)\nhttp.server.HTTPServer(('127.0.0.1',int(os.environ['PORT'])),H).serve_forever()","$PORT"]}"#,
    );
    let (sink, lines) = logs();
    let i = ProcessDriver::default()
        .start(StartSpec {
            spec: &s,
            module: None,
            files: Default::default(),
            logs: sink,
        })
        .await
        .unwrap();
    eventually("running", || i.status().state == InstanceState::Running).await;
    let r = i.handle(get("/hello?x=1")).await;
    assert_eq!(r.status, 200);
    let body = String::from_utf8(r.body.to_vec()).unwrap();
    let parts: Vec<&str> = body.split(' ').collect();
    assert_eq!(parts[0], parts[1], "$PORT substituted with PORT");
    assert_eq!(parts[2], "/hello?x=1");
    eventually("stdout in the log", || {
        lines.lock().unwrap().iter().any(|l| l == "serving")
    })
    .await;
    let port: u16 = parts[0].parse().unwrap();
    i.stop().await;
    assert_eq!(i.handle(get("/")).await.status, 503);
    // The process is gone and is not restarted.
    let mut gone_for = 0;
    let end = Instant::now() + Duration::from_secs(10);
    while gone_for < 10 {
        assert!(Instant::now() < end, "port {port} still answers after stop");
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => gone_for = 0,
            Err(_) => gone_for += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn process_that_exits_is_restarted_with_backoff() {
    let s = spec(
        r#"{"name":"p","driver":"process","artifact":"sh","args":["-c","echo started; exit 3"]}"#,
    );
    let (sink, lines) = logs();
    let i = ProcessDriver::default()
        .start(StartSpec {
            spec: &s,
            module: None,
            files: Default::default(),
            logs: sink,
        })
        .await
        .unwrap();
    eventually("two restarts", || i.status().restarts >= 2).await;
    let st = i.status();
    assert!(st.message.unwrap().contains("exit status: 3"));
    let l = lines.lock().unwrap().clone();
    assert!(l.iter().filter(|x| *x == "started").count() >= 2, "{l:?}");
    assert!(
        l.iter().any(|x| x.contains("restarting in 400 ms")),
        "backoff doubles: {l:?}"
    );
    assert_eq!(i.handle(get("/")).await.status, 503);
    i.stop().await;
}

#[tokio::test]
async fn missing_program_is_reported() {
    let s = spec(r#"{"name":"p","driver":"process","artifact":"/no/such/program"}"#);
    let i = ProcessDriver::default()
        .start(StartSpec {
            spec: &s,
            module: None,
            files: Default::default(),
            logs: logs().0,
        })
        .await
        .unwrap();
    eventually("failure reported", || {
        i.status()
            .message
            .is_some_and(|m| m.contains("cannot start"))
    })
    .await;
    i.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ft_guest_resumes_from_an_image_and_its_clock_never_goes_back() {
    use avail_statepoint::state::StateImage;
    let d = WasmDriver::new().unwrap();
    let s = spec(&format!(
        r#"{{"name":"f","driver":"wasm","artifact":"{DIGEST}","level":"ft","resources":{{"memory_mib":8}}}}"#
    ));
    let m = d.ft_module(&s, module("faulty"), logs().0).await.unwrap();
    let mut primary = m.fresh().unwrap();
    for _ in 0..3 {
        assert_eq!(primary.call(&get("/count")).unwrap().status, 200);
    }
    let mut image = StateImage::default();
    image.apply(&primary.capture(vec![]).unwrap()).unwrap();
    // The primary's clock was an hour ahead of this host's: the restored guest's clock
    // starts there.
    let ahead = primary.clock_ms().max(0) + 3_600_000;
    let mut restored = m.restored(&image, ahead).unwrap();
    assert_eq!(
        &restored.call(&get("/count")).unwrap().body[..],
        br#"{"count":4}"#,
        "state carried over"
    );
    let now: serde_json::Value =
        serde_json::from_slice(&restored.call(&get("/now")).unwrap().body).unwrap();
    assert!(now["now_ms"].as_i64().unwrap() >= ahead, "{now}");
    assert!(restored.clock_ms() >= ahead);
}
