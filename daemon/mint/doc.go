// Package mint hands out the NATS connection data nexlets and workloads use: scoped,
// short-lived users signed with an account signing key (the production choice), one
// shared user nkey (weaker, warned about), or nothing at all (development only).
//
// What a SigningKeyMinter user may do (N = node id, A = agent id, ns = namespace):
//
//	registration (5 min)  pub $NEX.SVC.N.agent.REGISTER.A
//	                      sub _INBOX_A.> (its own inbox, nats.CustomInboxPrefix)
//	nexlet (AgentTTL)     sub $NEX.SVC.N.agent.A.>  (STARTWORKLOAD.*, PING; QUERYWORKLOADS,
//	                          STOPWORKLOAD.*, GETWORKLOAD.* where a nexd node asks it alone)
//	                          $NEX.SVC.N.agent.{STOPWORKLOAD.*,GETWORKLOAD.*,QUERYWORKLOADS,PING,SETLAMEDUCK}
//	                          $NEX.SVC.<nexus>.agent.PINGWORKLOAD.* (when Nexus is set)
//	                          $NEX.FEED.A.events, _INBOX_A.> (no $SRV: no micro
//	                          discovery answered as the node)
//	                      pub $NEX.SVC.N.agent.HEARTBEAT.A, $NEX.SVC.N.agent.REGISTER.A,
//	                          $NEX.SVC.N.agent.{RENEWCREDS.A.*,RENEWAGENT.A,WORKLOADENDED.A.*},
//	                          $NEX.SVC.N.agent.FEED.A.> (its feeds, which the node passes
//	                          on for its own workloads); with allow_nexlet_direct_feeds
//	                          only, a nexlet that does not sign (upstream's SDK) or a
//	                          supervised one older than the relay also
//	                          $NEX.FEED.*.logs.>, .metrics.>, .events.> (any namespace);
//	                          replies to requests (no other inbox)
//	                      no JetStream, no control plane, no application subjects
//	workload (WorkloadTTL) pub+sub WorkloadSubjects(ns), default ns.>
//	                      sub $NEX.FEED.ns.logs.> (its namespace's logs, as upstream)
//	                      sub _INBOX.<workload id>.> only (and _INBOX_<workload id>.>,
//	                          the prefix of one an older nexd started); pub _INBOX.>,
//	                          _INBOX_tenant-ns.> (replies; no response permission,
//	                          which nats-server ranks above the denies below)
//	                      no JetStream (it answers on any reply subject its caller sets)
//	artifact reader       the nexlet's, for a nats:// fetch, never the workload's:
//	  (WorkloadTTL)           sub _INBOX_<workload id>-artifact.> only; read-only object
//	                          stores ArtifactBuckets(ns), default the bucket named ns:
//	                          stream info, message/direct get, ordered consumer
//	                          create/delete, flow control (what a nats:// fetch needs)
//	                      deny pub $NEX.>, deny sub $NEX.SVC.>
//
// A tenant of namespace ns (a user the operator makes; TenantPermissions):
//
//	pub $NEX.SVC.ns.control.> (auction, deploy, list, stop, clone), ns.>
//	sub $NEX.FEED.ns.> (logs, metrics, events), _INBOX_tenant-ns.> only, ns.>
//
// Other namespaces' subjects and feeds are simply not allowed. Configured workload
// subjects that start with a wildcard, $ ($NEX, $SYS, $KV, $JS…) or an inbox
// (_INBOX, _INBOX_…: a namespace named so) are refused at mint time.
//
// Expiry bounds every user. Nexlets get AgentTTL (nexlet_creds_ttl, 1 h) and renew
// their own user before it expires (RenewAgent: the nexlet makes the nkey, the node
// only signs its JWT); workloads get WorkloadTTL (workload_creds_ttl, 1 h) and their
// nexlet renews them (RenewWorkload). Revocation (on stop, and of superseded users
// after a renewal) needs the account JWT to be re-signed by an operator key, which the
// account signing key cannot do: give Options.Revoker (e.g. an AccountRevoker) or live
// with expiry (the Revoke calls then return ErrRevocationUnsupported).
package mint
