// Package backoff is a capped exponential backoff with jitter, shared by
// the subnet manager and the etcd registry.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff yields delays Min, 2*Min, 4*Min ... capped at Max, each scaled
// by a random factor in [0.5, 1] so that many hosts do not retry in step.
// The zero value is not usable; fill Min and Max. Not safe for concurrent use.
type Backoff struct {
	Min, Max time.Duration
	next     time.Duration
}

// Next returns the delay before the next attempt and doubles the base.
func (b *Backoff) Next() time.Duration {
	if b.next < b.Min {
		b.next = b.Min
	}
	d := b.next
	if b.next < b.Max {
		b.next *= 2
		if b.next > b.Max {
			b.next = b.Max
		}
	}
	return d/2 + rand.N(d/2+1)
}

// Reset starts again from Min.
func (b *Backoff) Reset() { b.next = 0 }

// Sleep waits d or until ctx is done; it reports whether the full d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
