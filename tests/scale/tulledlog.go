package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"
)

// logLine is one JSON line of tulled's log (--log-format=json), with the
// fields the harness reads.
type logLine struct {
	Time    time.Time `json:"time"`
	Level   string    `json:"level"`
	Msg     string    `json:"msg"`
	Subnet  string    `json:"subnet"`
	Peers   *int      `json:"peers"`
	Added   int       `json:"added"`
	Removed int       `json:"removed"`
}

// tulledLog follows a tulled log file from an offset: next returns the
// complete lines written since the last call. The harness reads tulled's
// state from its log rather than from /metrics, because a scrape of a
// daemon with 30,000 peers is itself a large load (see scrapeCost).
type tulledLog struct {
	path    string
	off     int64
	partial []byte    // an incomplete last line
	queue   []logLine // read, not yet taken
}

func followLog(path string) (*tulledLog, error) {
	st, err := os.Stat(path)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("tulled log: %w", err)
	}
	l := &tulledLog{path: path}
	if err == nil {
		l.off = st.Size()
	}
	return l, nil
}

// take returns the next JSON line, false when there is none yet.
func (l *tulledLog) take() (logLine, bool, error) {
	if len(l.queue) == 0 {
		lines, err := l.read()
		if err != nil {
			return logLine{}, false, err
		}
		l.queue = lines
	}
	if len(l.queue) == 0 {
		return logLine{}, false, nil
	}
	ll := l.queue[0]
	l.queue = l.queue[1:]
	return ll, true, nil
}

// read returns the JSON lines appended since the last read (other lines,
// such as the testbed's "=== start" header, are skipped).
func (l *tulledLog) read() ([]logLine, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, fmt.Errorf("tulled log: %w", err)
	}
	defer f.Close()
	if _, err := f.Seek(l.off, io.SeekStart); err != nil {
		return nil, fmt.Errorf("tulled log %s: %w", l.path, err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("tulled log %s: %w", l.path, err)
	}
	l.off += int64(len(data))
	data = append(l.partial, data...)
	end := bytes.LastIndexByte(data, '\n')
	if end < 0 {
		l.partial = data
		return nil, nil
	}
	l.partial = append([]byte(nil), data[end+1:]...)
	return parseLogLines(data[:end+1]), nil
}

func parseLogLines(data []byte) []logLine {
	var out []logLine
	for line := range bytes.Lines(data) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var ll logLine
		if json.Unmarshal(line, &ll) == nil {
			out = append(out, ll)
		}
	}
	return out
}
