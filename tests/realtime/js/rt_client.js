// A stock @supabase/realtime-js client on a real socket, driven by the WebSocket tests.
//
// Usage: RTJS_DIR=<folder with node_modules> node rt_client.js '<config JSON>'
// config: {url, apikey, token?, vsn?, channel, config?: {broadcast, presence, private},
//          changes?: [{event, schema, table, filter?}], join_extra?: {...},
//          max_events?: N (exit after N postgres_changes events), timeout_ms}
// stdout: one JSON object per line, each with a "type":
//   status {status, error}, postgres_changes {binding, payload}, broadcast {payload},
//   presence {event, key, newPresences|leftPresences, state}, system {payload},
//   result {id, result}, socket {event, code?, reason?}, sent {binary, kind}, hello {url},
//   exit {reason}
// stdin: one JSON command per line:
//   {cmd: "send", id, message}, {cmd: "track", id, payload}, {cmd: "untrack", id},
//   {cmd: "state", id}, {cmd: "exit"}
'use strict'

const readline = require('readline')

const dir = process.env.RTJS_DIR
const { RealtimeClient } = require(dir + '/node_modules/@supabase/realtime-js')
const WebSocket = require(dir + '/node_modules/ws')

// The ws transport, reporting the kind of every frame the client sends ("sent" lines).
class ReportingWebSocket extends WebSocket {
  send(data, ...rest) {
    const binary = typeof data !== 'string'
    out({ type: 'sent', binary, kind: binary ? new Uint8Array(data)[0] : null })
    return super.send(data, ...rest)
  }
}

const cfg = JSON.parse(process.argv[2])
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

let finished = false
function finish(reason) {
  if (finished) return
  finished = true
  out({ type: 'exit', reason })
  // Give stdout a moment to flush before leaving; the socket goes with the process.
  process.stdout.write('', () => process.exit(0))
}

const client = new RealtimeClient(cfg.url, {
  transport: ReportingWebSocket,
  params: { apikey: cfg.apikey },
  ...(cfg.vsn ? { vsn: cfg.vsn } : {}),
  heartbeatIntervalMs: 25000,
  timeout: 10000,
})
const version = require(dir + '/node_modules/@supabase/realtime-js/package.json').version
out({ type: 'hello', url: client.endpointURL(), version })
const conn = client.socketAdapter
if (conn && typeof conn.onClose === 'function') {
  conn.onClose((e) => out({ type: 'socket', event: 'close', code: e && e.code, reason: e && e.reason }))
}

async function main() {
  if (cfg.token) await client.setAuth(cfg.token)
  const channel = client.channel(cfg.channel, { config: cfg.config || {} })
  if (cfg.join_extra) channel.updateJoinPayload(cfg.join_extra)
  let events = 0
  ;(cfg.changes || []).forEach((binding, i) => {
    channel.on('postgres_changes', binding, (payload) => {
      out({ type: 'postgres_changes', binding: i, payload })
      events += 1
      if (cfg.max_events && events >= cfg.max_events) finish('max_events')
    })
  })
  channel.on('broadcast', { event: '*' }, (payload) => out({ type: 'broadcast', payload }))
  channel.on('system', {}, (payload) => out({ type: 'system', payload }))
  if (cfg.config && cfg.config.presence) {
    for (const event of ['sync', 'join', 'leave']) {
      channel.on('presence', { event }, (p) => {
        out({
          type: 'presence',
          event,
          key: p ? p.key : null,
          newPresences: p ? p.newPresences : undefined,
          leftPresences: p ? p.leftPresences : undefined,
          state: channel.presenceState(),
        })
      })
    }
  }
  channel.subscribe((status, err) => out({ type: 'status', status, error: err ? err.message : null }))

  const commands = readline.createInterface({ input: process.stdin })
  commands.on('line', async (line) => {
    if (!line.trim()) return
    const c = JSON.parse(line)
    let result
    if (c.cmd === 'exit') return finish('exit')
    if (c.cmd === 'send') result = await channel.send(c.message)
    else if (c.cmd === 'track') result = await channel.track(c.payload)
    else if (c.cmd === 'untrack') result = await channel.untrack()
    else if (c.cmd === 'state') result = channel.presenceState()
    else result = 'unknown command ' + c.cmd
    out({ type: 'result', id: c.id, result })
  })
  commands.on('close', () => finish('stdin_closed'))
}

setTimeout(() => finish('timeout'), cfg.timeout_ms || 30000)
main().catch((e) => {
  out({ type: 'error', message: String(e && e.stack ? e.stack : e) })
  finish('error')
})
