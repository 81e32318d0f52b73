// gopeer: the Go side of the interop specs (spec/27, spec/28). It runs one
// clientv3 recipe against an etcd endpoint and prints what it did, one
// line at a time, so a spec can follow it. Built by spec/helpers/gopeer.lua
// in GOPATH mode from Debian's golang-etcd-server-dev (offline).
//
//	gopeer ENDPOINT stm-increment ISOLATION KEY N  # N increments of KEY in an STM
//	gopeer ENDPOINT enqueue PREFIX VALUE...         # recipe.Queue
//	gopeer ENDPOINT dequeue PREFIX                  # dequeues until the value "stop"
//	gopeer ENDPOINT pq-enqueue PREFIX PRIO VALUE... # recipe.PriorityQueue
//	gopeer ENDPOINT pq-dequeue PREFIX N             # N items, in the order got
//	gopeer ENDPOINT rwlock PREFIX read|write SECS   # holds recipe.RWMutex SECS seconds
//	gopeer ENDPOINT double-barrier KEY COUNT        # recipe.DoubleBarrier: enters, then leaves
package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
	recipe "go.etcd.io/etcd/contrib/recipes"
	"google.golang.org/grpc/grpclog"
)

var isolations = map[string]concurrency.Isolation{
	"serializable_snapshot": concurrency.SerializableSnapshot,
	"serializable":          concurrency.Serializable,
	"repeatable_reads":      concurrency.RepeatableReads,
	"read_committed":        concurrency.ReadCommitted,
}

func fail(err error) {
	fmt.Println("error:", err)
	os.Exit(1)
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fail(err)
	}
	return n
}

func main() {
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, os.Stderr))
	if len(os.Args) < 4 {
		fail(fmt.Errorf("usage: gopeer ENDPOINT MODE ARGS..."))
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{os.Args[1]}, DialTimeout: 10 * time.Second})
	if err != nil {
		fail(err)
	}
	defer cli.Close()
	mode, args := os.Args[2], os.Args[3:]
	switch mode {
	case "stm-increment":
		iso, ok := isolations[args[0]]
		if !ok {
			fail(fmt.Errorf("unknown isolation %q", args[0]))
		}
		key := args[1]
		for i := 0; i < atoi(args[2]); i++ {
			_, err := concurrency.NewSTM(cli, func(s concurrency.STM) error {
				n, _ := strconv.Atoi(s.Get(key))
				s.Put(key, strconv.Itoa(n+1))
				return nil
			}, concurrency.WithIsolation(iso))
			if err != nil {
				fail(err)
			}
		}
	case "enqueue":
		q := recipe.NewQueue(cli, args[0])
		for _, v := range args[1:] {
			if err := q.Enqueue(v); err != nil {
				fail(err)
			}
		}
	case "dequeue":
		q := recipe.NewQueue(cli, args[0])
		for {
			v, err := q.Dequeue()
			if err != nil {
				fail(err)
			}
			if v == "stop" {
				break
			}
			fmt.Println("item", v)
		}
	case "pq-enqueue":
		q := recipe.NewPriorityQueue(cli, args[0])
		for _, v := range args[2:] {
			if err := q.Enqueue(v, uint16(atoi(args[1]))); err != nil {
				fail(err)
			}
		}
	case "pq-dequeue":
		q := recipe.NewPriorityQueue(cli, args[0])
		for i := 0; i < atoi(args[1]); i++ {
			v, err := q.Dequeue()
			if err != nil {
				fail(err)
			}
			fmt.Println("item", v)
		}
	case "rwlock":
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
		if err != nil {
			fail(err)
		}
		defer s.Close()
		rw := recipe.NewRWMutex(s, args[0])
		lock, unlock := rw.Lock, rw.Unlock
		if args[1] == "read" {
			lock, unlock = rw.RLock, rw.RUnlock
		}
		if err := lock(); err != nil {
			fail(err)
		}
		fmt.Println("locked")
		time.Sleep(time.Duration(atoi(args[2])) * time.Second)
		fmt.Println("unlocking")
		if err := unlock(); err != nil {
			fail(err)
		}
	case "double-barrier":
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
		if err != nil {
			fail(err)
		}
		defer s.Close()
		b := recipe.NewDoubleBarrier(s, args[0], atoi(args[1]))
		if err := b.Enter(); err != nil {
			fail(err)
		}
		fmt.Println("entered")
		if err := b.Leave(); err != nil {
			fail(err)
		}
		fmt.Println("left")
	default:
		fail(fmt.Errorf("unknown mode %q", mode))
	}
	fmt.Println("done")
}
