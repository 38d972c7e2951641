package protocol

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkDecode decodes each hot-path wire type from its fixture with Decode (which
// also checks required keys and enums), as the node and clients do per message.
func BenchmarkDecode(b *testing.B) {
	for _, name := range []string{"AuctionRequest", "AuctionResponse", "StartWorkloadRequest", "AgentStartWorkloadRequest", "NodePingResponse", "StopWorkloadResponse"} {
		data, err := os.ReadFile(filepath.Join("testdata", name+".json"))
		if err != nil {
			b.Fatal(err)
		}
		mk := fixtures()[name]
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if err := Decode(data, mk()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEncode encodes the same types with Marshal.
func BenchmarkEncode(b *testing.B) {
	for _, name := range []string{"AuctionRequest", "AuctionResponse", "StartWorkloadRequest", "AgentStartWorkloadRequest", "NodePingResponse", "StopWorkloadResponse"} {
		data, err := os.ReadFile(filepath.Join("testdata", name+".json"))
		if err != nil {
			b.Fatal(err)
		}
		v := fixtures()[name]()
		if err := json.Unmarshal(data, v); err != nil {
			b.Fatal(err)
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Marshal(v); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
