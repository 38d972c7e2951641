package protocol

// RenewCredsRequest is the body of a RenewCredsSubject request (a nexd extension).
type RenewCredsRequest struct {
	Namespace string `json:"namespace"`
}

// RenewAgentCredsRequest is the body of a RenewAgentCredsSubject request (a nexd
// extension): the public user nkey the nexlet made for its next user. The seed never
// leaves the nexlet, so a reply read by anyone else is of no use to them.
//
// With Switched set the nexlet says it now connects with the user of PublicKey (issued
// by an earlier request): the node then revokes its older users at once instead of
// after a bound, so a copy of them is worthless from then on.
type RenewAgentCredsRequest struct {
	PublicKey string `json:"public_key"`
	Switched  bool   `json:"switched,omitempty"`
}
