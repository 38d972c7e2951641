package mint

import (
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nexd-project/nexd/protocol"
)

const inbox = "_INBOX.>"

// privateInbox is what a child may subscribe to for replies: its own prefix only, so
// that no child reads replies meant for another (credentials above all).
func privateInbox(id string) string { return protocol.InboxPrefix(id) + ".>" }

// registerPermissions: a nexlet's bootstrap user may only send its registration and
// receive the reply on its own inbox.
func registerPermissions(agentID, nodeID string) jwt.Permissions {
	var p jwt.Permissions
	p.Pub.Allow.Add(protocol.RegisterSubject(nodeID, agentID))
	p.Sub.Allow.Add(privateInbox(agentID))
	return p
}

// agentPermissions: a nexlet serves its agent-plane endpoints on its node, heartbeats,
// asks its node to renew its workloads' credentials (only under its own agent id),
// and publishes the feeds of the workloads it runs under its own agent id on the
// node's relay, which passes on those of its own workloads. direct (upstream's SDK,
// which cannot relay, or nexd's older than the relay, and only where the operator set
// allow_nexlet_direct_feeds): also every namespace's feeds on $NEX.FEED, as its
// workloads may be in any (upstream keyed them by agent id, which its SDK never
// uses). It gets no JetStream: artifacts are fetched with workload creds. Nor $SRV:
// no node asks a nexlet there, and with it a nexlet answered `nats micro` discovery
// as the node's service (upstream's SDK's micro service asks for it: the server
// refuses those subscriptions, and the service's endpoints serve on).
func agentPermissions(agentID, nodeID, nexus string, direct bool) jwt.Permissions {
	var p jwt.Permissions
	pre := protocol.AgentPrefix(nodeID)
	p.Sub.Allow.Add(
		pre+"."+agentID+".>", // STARTWORKLOAD.<id>, PING, and the fan-outs a nexd node asks it alone
		pre+".STOPWORKLOAD.*",
		pre+".GETWORKLOAD.*",
		pre+".QUERYWORKLOADS",
		pre+".PING",
		pre+".SETLAMEDUCK",
		protocol.AgentEventsSubject(agentID),
		privateInbox(agentID),
	)
	if nexus != "" {
		p.Sub.Allow.Add(protocol.AgentPrefix(nexus) + ".PINGWORKLOAD.*")
	}
	p.Pub.Allow.Add(
		protocol.AgentHeartbeatSubject(nodeID, agentID),
		protocol.RegisterSubject(nodeID, agentID),           // a restarted SDK runner registers again
		protocol.RenewCredsSubject(nodeID, agentID, "*"),    // renew its workloads' creds
		protocol.RenewAgentCredsSubject(nodeID, agentID),    // and its own
		protocol.WorkloadEndedSubject(nodeID, agentID, "*"), // its workloads' ends, as requests
		protocol.FeedRelaySubject(nodeID, agentID, ">"),
	)
	if direct {
		p.Pub.Allow.Add(protocol.FeedWildcard("*", "logs"), protocol.FeedWildcard("*", "metrics"), protocol.FeedWildcard("*", "events"))
	}
	// Replies to the node's requests go out under the response permission: no
	// publishing into other clients' inboxes (a forged reply to nexctl, say). A slow
	// start sends progress reports to the same reply subject before its answer, so
	// more than one message, for as long as a start may take.
	p.Resp = &jwt.ResponsePermission{MaxMsgs: agentReplyMaxMsgs, Expires: agentReplyWindow}
	return p
}

// The nexlet's reply window on one request: its progress reports and the answer.
const (
	agentReplyMaxMsgs = 1000
	agentReplyWindow  = 15 * time.Minute
)

// workloadPermissions: a workload uses its namespace's application subjects, answers
// requests and reads its namespace's log feed (as upstream allowed). It never reaches
// $NEX.SVC (nor publishes any feed), nor JetStream: JetStream answers on the reply
// subject its caller sets, and delivers a push consumer to the deliver subject its
// creator sets, with the account's rights, so any API grant let a workload publish
// anywhere; its nexlet fetches its artifact with a user of its own
// (artifactPermissions).
// It answers requests on the subjects it may publish to: its namespace's, _INBOX.>
// (clients' default inboxes and other workloads', see protocol.WorkloadInboxPrefix)
// and its tenant's inbox. No response permission: nats-server lets a reply subject
// outrank every deny, and the requester (the workload itself, from a second
// connection) chooses it, so a workload published anywhere: another namespace's
// subjects, the node's LAMEDUCK, $KV and $JS.API.
func workloadPermissions(ns string, subjects []string, inboxPrefix string) (jwt.Permissions, error) {
	var p jwt.Permissions
	if err := checkInboxPrefix(inboxPrefix); err != nil {
		return p, err
	}
	wbox := inboxPrefix + ".>"
	for _, s := range subjects {
		if err := checkWorkloadSubject(s); err != nil {
			return p, fmt.Errorf("workload subjects for namespace %q: %w", ns, err)
		}
		p.Pub.Allow.Add(s)
		p.Sub.Allow.Add(s)
	}
	p.Pub.Allow.Add(inbox, protocol.TenantInboxPrefix(ns)+".>") // replies
	p.Sub.Allow.Add(wbox, protocol.FeedWildcard(ns, "logs"))
	p.Pub.Deny.Add("$NEX.>")
	p.Sub.Deny.Add("$NEX.SVC.>")
	return p, nil
}

// checkInboxPrefix refuses an inbox prefix that is not a private plain subject prefix.
func checkInboxPrefix(inboxPrefix string) error {
	if inboxPrefix == "" || inboxPrefix == "_INBOX" || strings.ContainsAny(inboxPrefix, "*> \t\r\n") ||
		strings.HasSuffix(inboxPrefix, ".") || strings.HasPrefix(inboxPrefix, "$NEX") {
		return fmt.Errorf("workload inbox prefix %q is not a private plain subject prefix", inboxPrefix)
	}
	return nil
}

// artifactPermissions: the user a nexlet fetches a workload's nats:// artifact with
// reads the object stores listed for its namespace and receives on its own inbox;
// nothing else. The workload never gets it.
func artifactPermissions(ns string, buckets []string, jsDomain, inboxPrefix string) (jwt.Permissions, error) {
	var p jwt.Permissions
	if err := checkInboxPrefix(inboxPrefix); err != nil {
		return p, err
	}
	p.Sub.Allow.Add(inboxPrefix + ".>")
	apis := []string{"$JS.API"}
	if jsDomain != "" {
		apis = append(apis, "$JS."+jsDomain+".API")
	}
	for _, b := range buckets {
		if err := checkToken("artifact bucket", b); err != nil {
			return p, fmt.Errorf("artifact buckets for namespace %q: %w", ns, err)
		}
		stream := "OBJ_" + b
		// Exactly what jetstream's ObjectStore + Get need: stream info, meta lookup
		// (direct or msg get), an ordered push consumer for the chunks (create, delete on
		// reset) and its flow-control replies. No publish to $O.<bucket>: read only.
		for _, api := range apis {
			p.Pub.Allow.Add(
				api+".STREAM.INFO."+stream,
				api+".STREAM.MSG.GET."+stream,
				api+".DIRECT.GET."+stream,
				api+".DIRECT.GET."+stream+".>",
				api+".CONSUMER.CREATE."+stream,
				api+".CONSUMER.CREATE."+stream+".>",
				api+".CONSUMER.DELETE."+stream+".>",
			)
		}
		p.Pub.Allow.Add("$JS.FC." + stream + ".>")
	}
	p.Pub.Deny.Add("$NEX.>")
	p.Sub.Deny.Add("$NEX.SVC.>")
	return p, nil
}

// checkWorkloadSubject refuses configured workload subjects that would open nex's own
// subjects, the system account's, other clients' inboxes, or everything.
func checkWorkloadSubject(s string) error {
	if s == "" || strings.ContainsAny(s, " \t\r\n") {
		return fmt.Errorf("invalid subject %q", s)
	}
	first, _, _ := strings.Cut(s, ".")
	switch {
	case first == ">" || first == "*":
		return fmt.Errorf("subject %q starts with a wildcard and would reach nex's own subjects", s)
	case strings.HasPrefix(first, "$"):
		// $NEX, $SYS, and $KV, $JS, $O…: the node-state bucket and JetStream's API.
		return fmt.Errorf("subject %q is reserved for nex, the system account and JetStream", s)
	case first == "_INBOX" || strings.HasPrefix(first, "_INBOX_"):
		// A namespace named so (ns.>) would read other clients' replies.
		return fmt.Errorf("subject %q is an inbox: it would read other clients' replies", s)
	}
	return nil
}
