package daemon

import "github.com/nats-io/nkeys"

// warmSignatures makes this process's first ed25519 key, signature and verification
// (each builds tables or runs a self-test once per process: 0.4-1.4 ms here) while
// the native nexlet starts, not when its signed registration arrives and nexd's start
// waits on its check.
func warmSignatures() {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return
	}
	sig, err := kp.Sign([]byte("warm"))
	if err != nil {
		return
	}
	_ = kp.Verify([]byte("warm"), sig)
}
