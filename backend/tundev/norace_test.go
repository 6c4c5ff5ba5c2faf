//go:build !race

package tundev_test

const raceEnabled = false
