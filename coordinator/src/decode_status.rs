//! Services braid does not generate (the standard health service) decode
//! with tonic-prost's codec, which answers a malformed message with
//! `Internal`. Wrapped in `InvalidArgumentOnDecode`, such an answer becomes
//! `InvalidArgument`, as braid's own services answer through `BraidCodec`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::server::NamedService;

/// Rewrites a trailers-only `grpc-status: 13` to 3. Only for services whose
/// handlers never answer `Internal` themselves, so the only source is the
/// request's decoding (the health service's `Check` and `Watch` answer
/// `NotFound` or a status, never `Internal`).
#[derive(Clone)]
pub struct InvalidArgumentOnDecode<S>(pub S);

impl<S: NamedService> NamedService for InvalidArgumentOnDecode<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for InvalidArgumentOnDecode<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let internal = tonic::Code::Internal as i32;
            if response.headers().get("grpc-status").is_some_and(|v| v.as_bytes() == internal.to_string().as_bytes()) {
                let invalid = HeaderValue::from(tonic::Code::InvalidArgument as i32);
                response.headers_mut().insert("grpc-status", invalid);
            }
            Ok(response)
        })
    }
}
