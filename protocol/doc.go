// Package protocol holds the $NEX wire protocol that nexd shares with upstream Nex:
// subject builders and the JSON message types, with field names exactly as upstream
// sends them. Required keys are always encoded (never omitempty) because upstream's
// generated decoders reject a message that lacks one.
//
// It imports nothing of this project, so nodes, nexlets and clients can all use it.
package protocol
