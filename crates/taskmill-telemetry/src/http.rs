//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::{Metrics, Readiness};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
}

/// A bound HTTP server; serve it with [`HttpServer::serve`].
#[derive(Debug)]
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(
        addr: SocketAddr,
        metrics: Metrics,
        readiness: Readiness,
    ) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the HTTP endpoint to {addr}: {e}"),
            )
        })?;
        let router = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz_handler))
            .with_state(AppState { metrics, readiness });
        Ok(HttpServer { listener, router })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz_handler(State(s): State<AppState>) -> impl IntoResponse {
    let (ready, failing) = s.readiness.status();
    if ready {
        (StatusCode::OK, "ready\n".to_string())
    } else if failing.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting\n".to_string(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
    }
}
