//! The `Admin` service: token management, for the operate role.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use braid_shared::proto::{self, admin_server::Admin};

use crate::auth::{Role, TokenRecord};
use crate::server::Coordinator;

pub struct AdminService {
    coordinator: Arc<Coordinator>,
}

impl AdminService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        AdminService { coordinator }
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn info(t: &TokenRecord) -> proto::TokenInfo {
    proto::TokenInfo {
        token_id: t.id.clone(),
        role: Role::parse(&t.role).map_or(proto::Role::Unspecified, Role::to_proto) as i32,
        created: Some(timestamp(t.created_ms)),
        expires: t.expires_ms.map(timestamp),
        single_use: t.single_use,
        used: t.used,
        revoked: t.revoked,
        description: t.description.clone(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[instrument(skip_all, err)]
    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let r = req.into_inner();
        let role =
            Role::from_proto(r.role).ok_or_else(|| Status::invalid_argument("role: submit, operate or agent"))?;
        let (record, token) = self.coordinator.tokens.create(role, r.ttl_seconds, r.single_use, &r.description)?;
        Ok(Response::new(proto::CreateTokenResponse {
            token_id: record.id,
            token,
            expires: record.expires_ms.map(timestamp),
        }))
    }

    #[instrument(skip_all, err)]
    async fn revoke_token(
        &self,
        req: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let id = &req.get_ref().token_id;
        if id.is_empty() || id.len() > 64 {
            return Err(Status::invalid_argument("token_id: required, at most 64 bytes"));
        }
        let revoked = self.coordinator.tokens.revoke(id)?;
        tracing::info!(token_id = %id, revoked, "token revoked");
        Ok(Response::new(proto::RevokeTokenResponse { revoked }))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let tokens = self.coordinator.tokens.list()?.iter().map(info).collect();
        Ok(Response::new(proto::ListTokensResponse { tokens }))
    }
}
