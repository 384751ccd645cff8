//! The HTTP server: the route table and the listener, until the shutdown token is cancelled.

use std::io;
use std::net::SocketAddr;

use crate::conn::*;
use crate::handle::*;
use crate::messages::*;
use crate::queues::*;
use crate::types::*;
use crate::wire::*;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

impl Emulator {
    /// Bind `addr` (e.g. 127.0.0.1:0), spawn the server on the current runtime, return the
    /// bound address. The server stops when `shutdown` is cancelled.
    pub async fn start(
        &self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.serve(listener, shutdown).await {
                warn!(error = %e, "queues emulator stopped with an error");
            }
        });
        Ok(bound)
    }

    /// Serve on an existing listener until `shutdown` is cancelled.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let app = self.router(shutdown.clone());
        axum::serve(
            ResetListener(listener),
            app.into_make_service_with_connect_info::<ResetSwitch>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    }

    pub(crate) fn router(&self, shutdown: CancellationToken) -> Router {
        let app = EmuApp {
            emu: self.clone(),
            shutdown,
        };
        let a = "/client/v4/accounts/{account_id}/queues";
        let q = "/client/v4/accounts/{account_id}/queues/{queue_id}";
        Router::new()
            .route(a, get(list_queues_handler).post(create_queue_handler))
            .route(
                q,
                get(get_queue_handler)
                    .delete(delete_queue_handler)
                    .patch(update_queue_handler)
                    .put(update_queue_handler),
            )
            .route(
                &format!("{q}/consumers"),
                get(list_consumers_handler).post(create_consumer_handler),
            )
            .route(
                &format!("{q}/consumers/{{consumer_id}}"),
                get(get_consumer_handler)
                    .put(update_consumer_handler)
                    .delete(delete_consumer_handler),
            )
            .route(&format!("{q}/metrics"), get(metrics_handler))
            .route(
                &format!("{q}/purge"),
                post(purge_queue_handler).get(purge_status_handler),
            )
            .route(&format!("{q}/messages/pull"), post(pull_handler))
            .route(&format!("{q}/messages/ack"), post(ack_handler))
            .route(&format!("{q}/messages/peek"), post(peek_handler))
            .route(&format!("{q}/messages/purge"), post(purge_messages_handler))
            .route(&format!("{q}/messages"), post(publish_handler))
            .route(&format!("{q}/messages/batch"), post(publish_batch_handler))
            .route_layer(axum::middleware::from_fn_with_state(app.clone(), api_gate))
            .route(
                "/client/v4/_emulator/queues/{queue_id}/stats",
                get(stats_handler),
            )
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(app)
    }
}
