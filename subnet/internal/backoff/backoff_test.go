package backoff

import (
	"testing"
	"time"
)

func TestBackoffGrowsWithJitterUpToMax(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	base := 100 * time.Millisecond
	for i := 0; i < 20; i++ {
		d := b.Next()
		if d < base/2 || d > base {
			t.Fatalf("delay %d: %s, want in [%s, %s]", i, d, base/2, base)
		}
		base = min(2*base, time.Second)
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Errorf("after Reset: %s", d)
	}
}
