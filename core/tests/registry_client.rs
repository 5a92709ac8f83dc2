//! The registry client against small HTTP origins on loopback that challenge, hand out tokens and
//! redirect, as Docker Hub and registries backed by object storage do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_core::config::{Config, RegistryConfig};
use shoal_core::registry::{RegistryClient, Request};
use shoal_core::Digest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request as the origin saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
}

type Responder = Arc<dyn Fn(&Seen) -> String + Send + Sync>;

/// Serves raw HTTP/1.1 on `addr`, answering each request with `respond`, recording what it saw.
async fn origin(addr: &str, respond: Responder) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind((addr, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (respond, log) = (respond.clone(), log.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(request_line)) = lines.next_line().await {
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                    let mut headers = HashMap::new();
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let req = Seen { path, headers };
                    log.lock().unwrap().push(req.clone());
                    if write.write_all(respond(&req).as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn response(status: &str, headers: &[(&str, String)], body: &str) -> String {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out + "\r\n" + body
}

fn client(registry: &str, rc: RegistryConfig) -> RegistryClient {
    let mut config = Config::default();
    config.download.retries = 0;
    config.registry.insert(registry.into(), rc);
    RegistryClient::new(Arc::new(config))
}

#[tokio::test]
async fn basic_credentials_are_sent_after_a_challenge_and_never_follow_a_redirect_to_another_host() {
    let (storage_port, storage_seen) = origin("127.0.0.2", Arc::new(|_| response("200 OK", &[], "blob bytes"))).await;
    let (port, seen) = origin(
        "127.0.0.1",
        Arc::new(move |req: &Seen| match req.headers.get("authorization") {
            None => response("401 Unauthorized", &[("WWW-Authenticate", "Basic realm=\"r\"".into())], ""),
            Some(a) if a == "Basic dTpw" => {
                response("307 Temporary Redirect", &[("Location", format!("http://127.0.0.2:{storage_port}/data?sig=1"))], "")
            }
            Some(_) => response("403 Forbidden", &[], ""),
        }),
    )
    .await;
    let registry = format!("127.0.0.1:{port}");
    let c = client(&registry, RegistryConfig { username: Some("u".into()), password: Some("p".into()), ..Default::default() });
    let digest = Digest::of(b"blob bytes");
    let resp = c.send(&Request::blob(&registry, "team/app", &digest)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "blob bytes");
    let storage = storage_seen.lock().unwrap().clone();
    assert_eq!(storage.len(), 1);
    assert!(!storage[0].headers.contains_key("authorization"), "credentials leaked to the storage host: {storage:?}");
    // The registry asked once for credentials; later requests send them up front.
    let resp = c.send(&Request::blob(&registry, "team/app", &digest)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let challenges = seen.lock().unwrap().iter().filter(|s| !s.headers.contains_key("authorization")).count();
    assert_eq!(challenges, 1);
}

#[tokio::test]
async fn bearer_tokens_are_fetched_for_the_scope_and_reused_until_they_expire() {
    let token_hits = Arc::new(Mutex::new(Vec::<String>::new()));
    let hits = token_hits.clone();
    let port_cell = Arc::new(Mutex::new(0u16));
    let cell = port_cell.clone();
    let (port, _) = origin(
        "127.0.0.1",
        Arc::new(move |req: &Seen| {
            if req.path.starts_with("/token") {
                hits.lock().unwrap().push(req.path.clone());
                return response("200 OK", &[("Content-Type", "application/json".into())], r#"{"token":"t0k","expires_in":300}"#);
            }
            match req.headers.get("authorization").map(String::as_str) {
                Some("Bearer t0k") => response("200 OK", &[("Content-Type", "application/vnd.oci.image.manifest.v1+json".into())], "{}"),
                _ => {
                    let port = *cell.lock().unwrap();
                    let challenge =
                        format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg\",scope=\"repository:team/app:pull\"");
                    response("401 Unauthorized", &[("WWW-Authenticate", challenge)], "")
                }
            }
        }),
    )
    .await;
    *port_cell.lock().unwrap() = port;
    let registry = format!("127.0.0.1:{port}");
    let c = client(&registry, RegistryConfig::default());
    for _ in 0..3 {
        let resp = c.send(&Request::manifest(&registry, "team/app", "v1")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let hits = token_hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 1, "the token must be cached: {hits:?}");
    assert!(hits[0].contains("service=reg") && hits[0].contains("scope=repository%3Ateam%2Fapp%3Apull"), "{hits:?}");
}

#[tokio::test]
async fn a_client_authorization_is_forwarded_and_a_refusal_comes_back_as_is() {
    let (port, seen) = origin(
        "127.0.0.1",
        Arc::new(|_| response("401 Unauthorized", &[("WWW-Authenticate", "Bearer realm=\"https://auth.example/token\"".into())], "no")),
    )
    .await;
    let registry = format!("127.0.0.1:{port}");
    let c = client(&registry, RegistryConfig::default());
    let mut req = Request::blob(&registry, "team/app", &Digest::of(b"x"));
    req.authorization = Some(http::HeaderValue::from_static("Bearer client-token"));
    let resp = c.send(&req).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("auth.example"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "a client's own credentials are not retried or replaced");
    assert_eq!(seen[0].headers["authorization"], "Bearer client-token");
}

#[tokio::test]
async fn server_errors_are_retried_then_returned() {
    let count = Arc::new(Mutex::new(0));
    let n = count.clone();
    let (port, _) = origin(
        "127.0.0.1",
        Arc::new(move |_| {
            let mut n = n.lock().unwrap();
            *n += 1;
            if *n < 3 {
                response("503 Service Unavailable", &[], "")
            } else {
                response("200 OK", &[], "ok")
            }
        }),
    )
    .await;
    let registry = format!("127.0.0.1:{port}");
    let mut config = Config::default();
    config.download.retries = 3;
    let c = RegistryClient::new(Arc::new(config));
    let resp = c.send(&Request::blob(&registry, "a", &Digest::of(b"ok"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(*count.lock().unwrap(), 3);
}

#[tokio::test]
async fn an_unreachable_registry_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let registry = format!("127.0.0.1:{port}");
    let c = client(&registry, RegistryConfig::default());
    let err = c.send(&Request::blob(&registry, "a", &Digest::of(b"x"))).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the registry") && err.contains("refused"), "{err}");
}
