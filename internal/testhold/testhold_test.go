package testhold

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReleased: a hold takes its test's release once, and without one waits no longer
// than its bound; a list naming no release directory does not wait at all.
func TestReleased(t *testing.T) {
	dir := t.TempDir()
	list := HeartbeatLate + "," + ReleaseIn(dir)
	if !Holds(list, HeartbeatLate) {
		t.Fatalf("Holds(%q) does not name %s", list, HeartbeatLate)
	}
	if err := Release(dir, HeartbeatLate); err != nil {
		t.Fatal(err)
	}
	if !Released(context.Background(), list, HeartbeatLate, time.Minute) {
		t.Fatal("a released hold waited out its bound")
	}
	if _, err := os.Stat(filepath.Join(dir, HeartbeatLate)); !os.IsNotExist(err) {
		t.Fatalf("the release was not taken: %v", err)
	}
	// Taken once: the next hold waits for its own release, here its bound.
	if Released(context.Background(), list, HeartbeatLate, 50*time.Millisecond) {
		t.Fatal("a release taken twice")
	}
	// Released meanwhile, while it waits.
	got := make(chan bool, 1)
	go func() { got <- Released(context.Background(), list, HeartbeatLate, time.Minute) }()
	if err := Release(dir, HeartbeatLate); err != nil {
		t.Fatal(err)
	}
	if !<-got {
		t.Fatal("a release made while the hold waited was not taken")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Released(ctx, list, HeartbeatLate, time.Minute) {
		t.Fatal("released with its context ended")
	}
	if Released(context.Background(), HeartbeatLate, HeartbeatLate, time.Minute) {
		t.Fatal("released with no release directory")
	}
}
