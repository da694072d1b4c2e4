//! The benchmark's floor: a Pingora `ProxyHttp` that only picks the peer, as Pingora's own
//! examples do. It routes like the benchmark's nginx (`/fast/...` and `/real/...` to two
//! upstreams, the prefix dropped) so that both see the same requests.
//!
//! `bare-proxy LISTEN FAST_UPSTREAM REAL_UPSTREAM THREADS [--tuned]`
//!
//! With `--tuned`, Pingora is set up as firstgate sets it up (no L4 read buffer on the plain
//! listener); `bare-proxy-tuned` adds firstgate's allocator. The benchmark runs both, to show
//! what the settings alone do for the floor.

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Bare {
    fast: SocketAddr,
    real: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let real = session.req_header().uri.path().starts_with("/real/");
        let addr = if real { self.real } else { self.fast };
        Ok(Box::new(HttpPeer::new(addr, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        // `/fast/v1/...` → `/v1/...`, as nginx's `proxy_pass http://fast/;` does.
        let path = upstream.uri.path();
        let rest = path.splitn(3, '/').nth(2).unwrap_or("");
        let uri = format!("/{rest}").parse().expect("a valid path");
        upstream.set_uri(uri);
        Ok(())
    }
}

#[allow(dead_code)] // `bare-proxy-tuned` has its own `main`
fn main() {
    run()
}

pub fn run() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, fast, real, threads, tuned) = match args.as_slice() {
        [_, l, f, r, t] => (l, f, r, t, false),
        [_, l, f, r, t, flag] if flag == "--tuned" => (l, f, r, t, true),
        _ => {
            eprintln!("usage: bare-proxy LISTEN FAST_UPSTREAM REAL_UPSTREAM THREADS [--tuned]");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads: threads.parse().expect("a thread count"),
        // As firstgate's: the default (128 idle connections) is too small for many streams.
        upstream_keepalive_pool_size: 4096,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let bare = Bare {
        fast: fast.parse().expect("an upstream address"),
        real: real.parse().expect("an upstream address"),
    };
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, bare);
    if tuned {
        proxy.add_listener(
            ListenerConfig::tcp(listen.as_str()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    } else {
        proxy.add_tcp(listen);
    }
    server.add_service(proxy);
    server.run_forever();
}
