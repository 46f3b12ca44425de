//! The HTTP/1.1 server under the admin and metrics endpoints: hyper on a tokio current-thread
//! runtime of its own thread, with everything an unauthenticated client could hold bounded.
//! These endpoints share the relay's process, so none of them may cost it threads or memory
//! without bound (issue 21: an endless header, slowloris, idle connections).
//!
//! Bounds, per endpoint:
//! - [`MAX_CONNECTIONS`] connections at once. When they are all taken, the oldest connection
//!   that has not yet sent a whole request head is closed to make room for the new one (so an
//!   idle flood cannot lock out an operator); when every one is in a request, the new
//!   connection is closed at once.
//! - A request head of at most [`MAX_HEAD_BYTES`] bytes and [`MAX_HEADERS`] header lines
//!   (hyper answers 431 past them), read within [`HEADER_READ_TIMEOUT`] (slowloris).
//! - A body of at most [`MAX_BODY_BYTES`] bytes (413 past it).
//! - One request per connection (no keep-alive), and [`CONNECTION_TIMEOUT`] for the whole
//!   connection, slow body and slow reader included; except a streaming answer (a
//!   [`StreamHandler`]'s, e.g. `GET /trace`), which lasts until its sender ends it: the stream
//!   handler bounds how many there are and how long each lasts.
//! - Handlers run one at a time on one blocking thread, so two threads per endpoint in all.
//!
//! The module also has the checks that an endpoint trusting its network position needs (no
//! token): [`host_is_loopback`] against DNS rebinding and [`cross_site`] against a web page's
//! state-changing requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tracing::{debug, warn};

/// Connections an endpoint holds at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a whole request head, from its connection (or its first byte).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a request head (request line and header lines) at most; hyper's read buffer.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Header lines of a request at most.
pub const MAX_HEADERS: usize = 64;
/// Bytes of a request body at most (the routes take none).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Lifetime of a connection at most: head, body, handler and answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a new connection waits for the slot of the connection closed for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// A request as a handler sees it.
#[derive(Debug)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path of the request target, still percent-encoded, without the query.
    pub path: String,
    /// The query of the request target (after `?`, still percent-encoded; empty when none).
    pub query: String,
    /// The header fields.
    pub headers: HeaderMap,
    /// The body (at most [`MAX_BODY_BYTES`]).
    pub body: Bytes,
}

/// A handler's answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` of `body`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

/// Answers one request; runs on the endpoint's blocking thread (it may wait, e.g. for the
/// control loop).
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A streaming answer: status 200 with `content_type`, then each chunk as it comes; the body
/// ends when the sender is dropped. When the client goes away the receiver is dropped, so the
/// sender's next send fails.
#[derive(Debug)]
pub struct Stream {
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body's chunks.
    pub chunks: mpsc::Receiver<Bytes>,
}

/// Answers a request with a [`Stream`] (`Some(Ok)`), a plain answer (`Some(Err)`), or leaves it
/// to the [`Handler`] (`None`). Runs on the blocking thread before the handler.
pub type StreamHandler = Arc<dyn Fn(&Request) -> Option<Result<Stream, Response>> + Send + Sync>;

/// The body of a [`Stream`].
struct ChunkBody(mpsc::Receiver<Bytes>);

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

type AnyBody = Either<Full<Bytes>, ChunkBody>;

/// A running endpoint: one thread with the accept loop and the connections, one for handlers.
pub struct HttpServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `listener` with `handler` on threads named `name` (and `name`-handler).
    /// Errors: the runtime or its thread could not be made.
    pub fn start(name: &str, listener: TcpListener, handler: Handler) -> std::io::Result<HttpServer> {
        Self::start_streaming(name, listener, handler, Arc::new(|_: &Request| None))
    }

    /// [`start`](Self::start), with `streams` asked first for each request.
    pub fn start_streaming(
        name: &str,
        listener: TcpListener,
        handler: Handler,
        streams: StreamHandler,
    ) -> std::io::Result<HttpServer> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(1)
            .thread_name(format!("{name}-handler"))
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, (handler, streams), stopped).await,
                    Err(e) => warn!("HTTP endpoint: the listener cannot be served: {e}"),
                }
            });
            // Open connections end with the runtime; a handler still running gets a second.
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(HttpServer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Open {
    /// True until its request head has arrived.
    waiting: Arc<AtomicBool>,
    /// Closes it.
    evict: Arc<Notify>,
}

/// The open connections by age (ids grow).
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Open>,
}

impl Connections {
    /// Closes the oldest connection still waiting for its request head; false when none is.
    fn evict_oldest_waiting(&mut self) -> bool {
        let Some(id) = self.open.iter().find(|(_, c)| c.waiting.load(Ordering::Relaxed)).map(|(id, _)| *id) else {
            return false;
        };
        if let Some(c) = self.open.remove(&id) {
            c.evict.notify_one();
        }
        true
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: (Handler, StreamHandler),
    mut stopped: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning on the backlog.
                    warn!("HTTP endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let evicted = connections.lock().map(|mut c| c.evict_oldest_waiting()).unwrap_or(false);
                if !evicted {
                    debug!("HTTP endpoint: every connection is in a request; closing a new one");
                    continue;
                }
                match tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
        };
        let waiting = Arc::new(AtomicBool::new(true));
        let evict = Arc::new(Notify::new());
        let id = {
            let Ok(mut c) = connections.lock() else { continue };
            let id = c.next_id;
            c.next_id += 1;
            c.open.insert(id, Open { waiting: waiting.clone(), evict: evict.clone() });
            id
        };
        let (handler, connections) = (handler.clone(), connections.clone());
        tokio::spawn(async move {
            serve(stream, handler, waiting, &evict).await;
            if let Ok(mut c) = connections.lock() {
                c.open.remove(&id);
            }
            drop(permit);
        });
    }
}

/// Serves one connection (one request) within its bounds.
async fn serve(
    stream: tokio::net::TcpStream,
    handler: (Handler, StreamHandler),
    waiting: Arc<AtomicBool>,
    evict: &Notify,
) {
    let streaming = Arc::new(AtomicBool::new(false));
    let is_streaming = streaming.clone();
    let service = hyper::service::service_fn(move |req| {
        waiting.store(false, Ordering::Relaxed);
        let (handler, streaming) = (handler.clone(), streaming.clone());
        async move { Ok::<_, Infallible>(answer(req, handler, &streaming).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let deadline = tokio::time::sleep(CONNECTION_TIMEOUT);
    let mut deadline = std::pin::pin!(deadline);
    let mut exempt = false;
    loop {
        tokio::select! {
            done = &mut connection => {
                if let Err(e) = done {
                    debug!("HTTP endpoint: connection ended: {e}");
                }
                return;
            }
            _ = &mut deadline, if !exempt => {
                // A streaming answer lasts as long as its sender: the stream handler bounds it.
                if is_streaming.load(Ordering::Relaxed) {
                    exempt = true;
                    continue;
                }
                debug!("HTTP endpoint: connection timed out");
                return;
            }
            _ = evict.notified() => {
                debug!("HTTP endpoint: idle connection closed for a new one");
                return;
            }
        }
    }
}

async fn answer(
    req: hyper::Request<Incoming>,
    (handler, streams): (Handler, StreamHandler),
    streaming: &AtomicBool,
) -> hyper::Response<AnyBody> {
    let (parts, body) = req.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return response(too_large());
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return response(too_large()),
    };
    let request = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body,
    };
    let answer = tokio::task::spawn_blocking(move || streams(&request).unwrap_or_else(|| Err(handler(&request)))).await;
    match answer {
        Ok(Ok(stream)) => {
            streaming.store(true, Ordering::Relaxed);
            let mut out = hyper::Response::new(Either::Right(ChunkBody(stream.chunks)));
            out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(stream.content_type));
            out.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            out
        }
        Ok(Err(r)) => response(r),
        Err(_) => response(Response {
            status: 500,
            content_type: "text/plain; charset=utf-8",
            body: "internal error\n".into(),
        }),
    }
}

fn too_large() -> Response {
    Response { status: 413, content_type: "text/plain; charset=utf-8", body: "request body too large\n".into() }
}

fn response(r: Response) -> hyper::Response<AnyBody> {
    let mut out = hyper::Response::new(Either::Left(Full::new(Bytes::from(r.body))));
    *out.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    out
}

/// True when the request's one `Host` field names a loopback IP or `localhost`, with the
/// listener's `port` (a Host without a port passes only for port 80). An endpoint that trusts
/// its loopback address (no token) answers nothing else: a web page that rebinds its own DNS
/// name to 127.0.0.1 sends its own name as Host.
pub fn host_is_loopback(headers: &HeaderMap, port: u16) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else { return false };
    let Ok(host) = host.to_str() else { return false };
    let (name, given_port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, p)) => match p.strip_prefix(':') {
                Some(p) => (ip, Some(p)),
                None => return false,
            },
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        },
    };
    let port_ok = match given_port {
        Some(p) => p.parse::<u16>().ok() == Some(port),
        None => port == 80,
    };
    let name_ok = name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    port_ok && name_ok
}

/// Why a state-changing request (anything but GET and HEAD) looks like a browser's
/// cross-site request, or `None`: a `Sec-Fetch-Site` other than `same-origin` or `none`, an
/// `Origin` other than this endpoint's own, or a content type an HTML form can send
/// (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`). Command-line
/// clients (curl, `uturn admin`) send none of them.
pub fn cross_site(method: &Method, headers: &HeaderMap) -> Option<&'static str> {
    if method == Method::GET || method == Method::HEAD {
        return None;
    }
    let value = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").trim());
    if let Some(site) = value(header::HeaderName::from_static("sec-fetch-site")) {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some("Sec-Fetch-Site is not same-origin");
        }
    }
    if let Some(origin) = value(header::ORIGIN) {
        let own = value(header::HOST).map(|h| format!("http://{h}"));
        if own.is_none_or(|own| !origin.eq_ignore_ascii_case(&own)) {
            return Some("Origin is not this endpoint");
        }
    }
    if let Some(ct) = value(header::CONTENT_TYPE) {
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"].contains(&essence.as_str()) {
            return Some("a form's content type");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn host_must_be_loopback_with_the_port() {
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080", "127.1.2.3:8080"] {
            assert!(host_is_loopback(&headers(&[("host", ok)]), 8080), "{ok}");
        }
        for bad in ["evil.example:8080", "127.0.0.1:8081", "127.0.0.1", "[::1]", "10.0.0.1:8080", "[::1]x", ""] {
            assert!(!host_is_loopback(&headers(&[("host", bad)]), 8080), "{bad}");
        }
        assert!(host_is_loopback(&headers(&[("host", "localhost")]), 80));
        assert!(!host_is_loopback(&headers(&[]), 8080), "no Host");
        assert!(!host_is_loopback(&headers(&[("host", "localhost:8080"), ("host", "evil:8080")]), 8080));
    }

    #[test]
    fn cross_site_requests_are_told_apart() {
        let post = Method::POST;
        assert_eq!(cross_site(&post, &headers(&[("host", "127.0.0.1:9")])), None, "curl");
        assert_eq!(cross_site(&Method::GET, &headers(&[("sec-fetch-site", "cross-site")])), None);
        assert!(cross_site(&post, &headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&post, &headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert_eq!(cross_site(&post, &headers(&[("sec-fetch-site", "same-origin")])), None);
        let h = headers(&[("host", "127.0.0.1:9"), ("origin", "http://evil.example")]);
        assert!(cross_site(&post, &h).is_some());
        assert!(cross_site(&post, &headers(&[("host", "127.0.0.1:9"), ("origin", "null")])).is_some());
        assert_eq!(cross_site(&post, &headers(&[("host", "127.0.0.1:9"), ("origin", "http://127.0.0.1:9")])), None);
        for ct in ["application/x-www-form-urlencoded", "Multipart/Form-Data; boundary=x", "text/plain;charset=utf-8"] {
            assert!(cross_site(&Method::DELETE, &headers(&[("content-type", ct)])).is_some(), "{ct}");
        }
        assert_eq!(cross_site(&post, &headers(&[("content-type", "application/json")])), None);
    }
}
