//! Guards that decide from the request head alone (Host, sizes, Origin,
//! bearer credentials) as plain tower layers: no boxed future and no state
//! clone per request, which `middleware::from_fn` would cost on the token
//! hot path.

use std::future::{ready, Ready};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures_util::future::Either;
use tower_layer::Layer;
use tower_service::Service;

/// A synchronous check: `Some(answer)` stops the request with that answer.
pub trait RequestCheck: Clone + Send + Sync + 'static {
    fn check(&self, req: &Request) -> Option<Response>;
}

/// Layer running `C` before the inner service.
#[derive(Clone)]
pub struct CheckLayer<C> {
    check: C,
}

impl<C> CheckLayer<C> {
    pub fn new(check: C) -> Self {
        CheckLayer { check }
    }
}

impl<S, C: Clone> Layer<S> for CheckLayer<C> {
    type Service = Checked<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Checked {
            inner,
            check: self.check.clone(),
        }
    }
}

/// The service `CheckLayer` wraps around the inner one.
#[derive(Clone)]
pub struct Checked<S, C> {
    inner: S,
    check: C,
}

impl<S, C> Service<Request> for Checked<S, C>
where
    S: Service<Request, Response = Response>,
    C: RequestCheck,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match self.check.check(&req) {
            Some(answer) => Either::Left(ready(Ok(answer))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}
