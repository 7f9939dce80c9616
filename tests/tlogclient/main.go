// Command tlogclient reads a merkle-listener log over HTTP with Go's golang.org/x/mod/sumdb
// packages only (note, tlog): it verifies the signed checkpoint, reads the C2SP tlog-tiles,
// checks the tree hash, inclusion and consistency proofs computed by tlog itself against the
// server's JSON proofs, and the entry bundles against the leaf hashes.
//
// Usage: tlogclient BASE_URL LOG VKEY
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

var base, logName string

func get(path string) []byte {
	resp, err := http.Get(base + "/" + logName + "/" + path)
	if err != nil {
		fail("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		fail("GET %s: status %d: %s", path, resp.StatusCode, body)
	}
	return body
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
	os.Exit(1)
}

// tileReader fetches C2SP tiles: tlog's paths carry the height ("tile/8/..."), C2SP's do not.
type tileReader struct{}

func (tileReader) Height() int { return 8 }

func (tileReader) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		out[i] = get(strings.Replace(t.Path(), "tile/8/", "tile/", 1))
	}
	return out, nil
}

func (tileReader) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

type jsonProof struct {
	LeafIndex int64    `json:"leaf_index"`
	TreeSize  int64    `json:"tree_size"`
	Proof     []string `json:"proof"`
	Root      string   `json:"root"`
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: tlogclient BASE_URL LOG VKEY")
	}
	base, logName = strings.TrimRight(os.Args[1], "/"), os.Args[2]
	verifier, err := note.NewVerifier(os.Args[3])
	if err != nil {
		fail("verifier key: %v", err)
	}
	msg, err := note.Open(get("checkpoint"), note.VerifierList(verifier))
	if err != nil {
		fail("checkpoint signature: %v", err)
	}
	lines := strings.Split(msg.Text, "\n")
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("checkpoint size: %v", err)
	}
	rootBytes, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(rootBytes) != tlog.HashSize {
		fail("checkpoint root: %v", err)
	}
	var root tlog.Hash
	copy(root[:], rootBytes)
	tree := tlog.Tree{N: size, Hash: root}
	hr := tlog.TileHashReader(tree, tileReader{})

	th, err := tlog.TreeHash(size, hr)
	if err != nil || th != root {
		fail("tree hash from tiles: %v (%v vs %v)", err, th, root)
	}
	checked := 0
	for _, i := range []int64{0, 1, 7, 255, 256, size / 2, size - 1} {
		p, err := tlog.ProveRecord(size, i, hr)
		if err != nil {
			fail("prove record %d: %v", i, err)
		}
		leaf, err := hr.ReadHashes([]int64{tlog.StoredHashIndex(0, i)})
		if err != nil {
			fail("leaf %d: %v", i, err)
		}
		if err := tlog.CheckRecord(p, size, root, i, leaf[0]); err != nil {
			fail("check record %d: %v", i, err)
		}
		var jp jsonProof
		resp, err := http.Get(fmt.Sprintf("%s/v1/logs/%s/proof/inclusion?index=%d&size=%d", base, logName, i, size))
		if err != nil {
			fail("json proof: %v", err)
		}
		if err := json.NewDecoder(resp.Body).Decode(&jp); err != nil {
			fail("json proof: %v", err)
		}
		resp.Body.Close()
		if len(jp.Proof) != len(p) {
			fail("json proof of %d has %d hashes, tlog's has %d", i, len(jp.Proof), len(p))
		}
		for k, h := range jp.Proof {
			if h != base64.StdEncoding.EncodeToString(p[k][:]) {
				fail("json proof of %d differs from tlog's at hash %d", i, k)
			}
		}
		checked++
	}
	for _, m := range []int64{1, 3, 256, size / 3, size - 1, size} {
		old, err := tlog.TreeHash(m, hr)
		if err != nil {
			fail("tree hash %d: %v", m, err)
		}
		p, err := tlog.ProveTree(size, m, hr)
		if err != nil {
			fail("prove tree %d: %v", m, err)
		}
		if err := tlog.CheckTree(p, size, root, m, old); err != nil {
			fail("check tree %d -> %d: %v", m, size, err)
		}
	}
	entries := int64(0)
	for n := int64(0); n*256 < size; n++ {
		w := size - n*256
		t := tlog.Tile{H: 8, L: 0, N: n, W: 256}
		if w < 256 {
			t.W = int(w)
		}
		path := strings.Replace(t.Path(), "tile/8/0/", "tile/entries/", 1)
		bundle := get(path)
		r := bytes.NewReader(bundle)
		for k := int64(0); k < int64(t.W); k++ {
			var l uint16
			if err := binary.Read(r, binary.BigEndian, &l); err != nil {
				fail("entry bundle %s: %v", path, err)
			}
			e := make([]byte, l)
			if _, err := io.ReadFull(r, e); err != nil {
				fail("entry bundle %s: %v", path, err)
			}
			leaf, err := hr.ReadHashes([]int64{tlog.StoredHashIndex(0, n*256+k)})
			if err != nil || tlog.RecordHash(e) != leaf[0] {
				fail("entry %d does not hash to its leaf", n*256+k)
			}
			entries++
		}
		if r.Len() != 0 {
			fail("entry bundle %s: %d trailing bytes", path, r.Len())
		}
	}
	fmt.Printf("OK: %s size %d: signature, tree hash, %d inclusion proofs, 6 consistency proofs, %d entries\n",
		lines[0], size, checked, entries)
}
