// How long to wait before trying again: the socket's reconnects and a channel's rejoins
// both back off this way, so it lives apart from either.

/** Full-jitter-ish exponential backoff: half fixed, half random. */
export function backoffDelay(attempt, baseMs = 500, capMs = 15000, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
