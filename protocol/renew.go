package protocol

// RenewCredsRequest is the body of a RenewCredsSubject request (a nexd extension).
type RenewCredsRequest struct {
	Namespace string `json:"namespace"`
}
