//! The `Admin` service: token management, for the operate role.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use braid_shared::limits;
use braid_shared::proto::{self, admin_server::Admin};

use super::convert;
use crate::auth::Role;
use crate::model::{timestamp, valid_agent_name};
use crate::state::Coordinator;

pub struct AdminService {
    coordinator: Arc<Coordinator>,
}

impl AdminService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        AdminService { coordinator }
    }

    async fn set_cordon(
        &self,
        req: Request<proto::AgentRequest>,
        cordoned: bool,
    ) -> Result<Response<proto::AgentInfo>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let agent = {
            let mut farm = self.coordinator.farm();
            let effects = farm.set_cordoned(&req.get_ref().name, cordoned)?;
            self.coordinator.perform(&farm, effects);
            farm.agent_list().into_iter().find(|a| a.name == req.get_ref().name).map(|a| convert::agent_info(&farm, a))
        };
        // Stored before it is acknowledged: a restart keeps the cordon.
        self.coordinator.stored().await?;
        agent.map(Response::new).ok_or_else(|| Status::not_found("agent vanished"))
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
        let ttl_seconds = u32::try_from(r.ttl_seconds)
            .ok()
            .filter(|t| u64::from(*t) <= limits::TOKEN_TTL_SECONDS)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "ttl_seconds: {} is more than the limit of {} (10 years)",
                    r.ttl_seconds,
                    limits::TOKEN_TTL_SECONDS
                ))
            })?;
        let agent_name = (!r.agent_name.is_empty()).then_some(r.agent_name.as_str());
        let (record, token) =
            self.coordinator.tokens.create(role, ttl_seconds, r.single_use, &r.description, agent_name, r.replace)?;
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

    async fn list_agents(
        &self,
        req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let farm = self.coordinator.farm();
        let agents = farm.agent_list().into_iter().map(|a| convert::agent_info(&farm, a)).collect();
        Ok(Response::new(proto::ListAgentsResponse { agents }))
    }

    #[instrument(skip_all, err, fields(agent = %req.get_ref().name))]
    async fn cordon(&self, req: Request<proto::AgentRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        self.set_cordon(req, true).await
    }

    #[instrument(skip_all, err, fields(agent = %req.get_ref().name))]
    async fn uncordon(&self, req: Request<proto::AgentRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        let info = self.set_cordon(req, false).await;
        self.coordinator.wake.notify_one();
        info
    }

    #[instrument(skip_all, err, fields(agent = %req.get_ref().name))]
    async fn drain(&self, req: Request<proto::AgentRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        self.set_cordon(req, true).await
    }

    #[instrument(skip_all, err, fields(agent = %braid_shared::shorten(&req.get_ref().name, 80)))]
    async fn forget_agent(
        &self,
        req: Request<proto::AgentRequest>,
    ) -> Result<Response<proto::ForgetAgentResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let name = &req.get_ref().name;
        if !valid_agent_name(name) {
            return Err(Status::invalid_argument(format!(
                "name: {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
                braid_shared::shorten(name, 80),
                braid_shared::limits::AGENT_NAME_BYTES
            )));
        }
        // Revoke first: a session opened between the two steps is refused.
        let revoked_serials = crate::enroll::forget(&self.coordinator.store, name)?;
        let (disconnected, requeued_jobs) = self.coordinator.change(|farm| farm.forget_agent(name));
        self.coordinator.wake.notify_one();
        Ok(Response::new(proto::ForgetAgentResponse { revoked_serials, disconnected, requeued_jobs }))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Operate)?;
        let tokens = self.coordinator.tokens.list()?.iter().map(convert::token_info).collect();
        Ok(Response::new(proto::ListTokensResponse { tokens }))
    }

    #[instrument(skip_all, err, fields(agent = %braid_shared::shorten(&req.get_ref().agent, 80)))]
    async fn cache_usage(&self, req: Request<proto::CacheRequest>) -> Result<Response<proto::CacheResponse>, Status> {
        crate::cachecmd::run(&self.coordinator, req, false).await
    }

    #[instrument(skip_all, err, fields(agent = %braid_shared::shorten(&req.get_ref().agent, 80)))]
    async fn prune_cache(&self, req: Request<proto::CacheRequest>) -> Result<Response<proto::CacheResponse>, Status> {
        crate::cachecmd::run(&self.coordinator, req, true).await
    }

    #[instrument(skip_all, err)]
    async fn coordinator_status(
        &self,
        req: Request<proto::CoordinatorStatusRequest>,
    ) -> Result<Response<proto::CoordinatorStatusResponse>, Status> {
        self.coordinator.tokens.authorize(&req, Role::Submit)?;
        let c = self.coordinator.clone();
        let store_healthy = tokio::task::spawn_blocking(move || c.store.cordons().is_ok()).await.unwrap_or(false);
        let c = &self.coordinator;
        let store_errors = c.store.postgres().map_or(0, |p| p.errors.load(std::sync::atomic::Ordering::Relaxed));
        Ok(Response::new(proto::CoordinatorStatusResponse {
            leader: c.leadership.is_leader(),
            term: c.leadership.term.load(std::sync::atomic::Ordering::SeqCst),
            leader_address: c.leadership.address(),
            store: c.leadership.store_kind.to_owned(),
            store_healthy,
            store_errors,
            version: braid_build_info::LONG_VERSION.to_owned(),
        }))
    }
}
