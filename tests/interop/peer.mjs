// A real js-libp2p node for p2pnode's interop tests and benchmarks.
// Prints one JSON line {"peerId", "addrs"} once listening, then answers JSON-line commands on stdin:
//   {"id", "op": "ping", "addr", "count"}             -> {"id", "rtts": [ms...]}
//   {"id", "op": "identify", "addr"}                  -> {"id", "agentVersion", "protocols", "listenAddrs", "observedAddr"}
//   {"id", "op": "echo", "addr", "streams", "bytes"}  -> {"id", "ok", "seconds"}  (byte-exact check of the echo)
//   {"id", "op": "sink", "addr", "streams", "bytes"}  -> {"id", "ok", "seconds"}  (one-way bulk, for benchmarks)
//   {"id", "op": "hangup", "addr"}                    -> {"id", "ok"}  (close connections to that peer)
// Serves /p2pnode/test/echo/1.0.0 and /p2pnode/test/sink/1.0.0 itself.

// js-libp2p 3.x targets Node >= 22; on Node 20 it needs these two (see tests/interop/README.md).
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
const undici = await import('undici')
globalThis.WebSocket = undici.WebSocket

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { webSockets } = await import('@libp2p/websockets')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { ping } = await import('@libp2p/ping')
const { identify } = await import('@libp2p/identify')
const { multiaddr } = await import('@multiformats/multiaddr')
const readline = await import('node:readline')
const crypto = await import('node:crypto')

const ECHO = '/p2pnode/test/echo/1.0.0'
const SINK = '/p2pnode/test/sink/1.0.0'
const CHUNK = 64 * 1024
const host = process.env.PEER_HOST ?? '127.0.0.1'
const ipProto = host.includes(':') ? 'ip6' : 'ip4'

const node = await createLibp2p({
  addresses: { listen: [`/${ipProto}/${host}/tcp/0`, `/${ipProto}/${host}/tcp/0/ws`] },
  transports: [tcp(), webSockets()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { ping: ping(), identify: identify() },
  connectionGater: { denyDialMultiaddr: () => false }
})

const handlerOptions = { maxInboundStreams: 256, force: true }
await node.handle(ECHO, async (stream) => {
  for await (const chunk of stream) {
    if (!stream.send(chunk)) await stream.onDrain()
  }
  await stream.close()
}, handlerOptions)

await node.handle(SINK, async (stream) => {
  let total = 0
  for await (const chunk of stream) total += chunk.byteLength
  const reply = new Uint8Array(8)
  new DataView(reply.buffer).setBigUint64(0, BigInt(total))
  stream.send(reply)
  await stream.close()
}, handlerOptions)

function pattern (seed) {
  const buf = new Uint8Array(CHUNK)
  crypto.createHash('sha256')
  for (let i = 0; i < CHUNK; i += 32) {
    buf.set(crypto.createHash('sha256').update(`${seed}:${i}`).digest(), i)
  }
  return buf
}

function concat (chunks, total) {
  const out = new Uint8Array(total)
  let off = 0
  for (const c of chunks) { out.set(c, off); off += c.byteLength }
  return out
}

async function oneStream (target, protocol, bytes, index) {
  const stream = await node.dialProtocol(target, protocol)
  const data = pattern(index)
  const writer = (async () => {
    let sent = 0
    while (sent < bytes) {
      const n = Math.min(CHUNK, bytes - sent)
      if (!stream.send(n === CHUNK ? data : data.subarray(0, n))) await stream.onDrain()
      sent += n
    }
    await stream.close()
  })()
  let received = 0
  let mismatch = null
  const tail = []
  for await (const chunk of stream) {
    const bytesChunk = chunk.subarray ? chunk.subarray() : chunk
    if (protocol === ECHO) {
      for (let i = 0; i < bytesChunk.byteLength && mismatch === null; i++) {
        if (bytesChunk[i] !== data[(received + i) % CHUNK]) mismatch = received + i
      }
    } else {
      tail.push(bytesChunk)
    }
    received += bytesChunk.byteLength
  }
  await writer
  if (protocol === ECHO) {
    if (mismatch !== null) throw new Error(`echo mismatch at byte ${mismatch} of stream ${index}`)
    if (received !== bytes) throw new Error(`echo returned ${received} of ${bytes} bytes on stream ${index}`)
  } else {
    const reply = concat(tail, received)
    const count = Number(new DataView(reply.buffer).getBigUint64(0))
    if (count !== bytes) throw new Error(`sink counted ${count} of ${bytes} bytes on stream ${index}`)
  }
}

async function run (cmd) {
  const target = multiaddr(cmd.addr)
  switch (cmd.op) {
    case 'ping': {
      const rtts = []
      for (let i = 0; i < (cmd.count ?? 1); i++) rtts.push(await node.services.ping.ping(target))
      return { rtts }
    }
    case 'identify': {
      // js-libp2p identifies every new connection by itself and allows one identify stream at
      // a time: on a new connection take that result; on an existing one, ask again.
      const targetPeer = target.toString().split('/p2p/')[1]
      const existing = node.getConnections().some(c => c.remotePeer.toString() === targetPeer)
      let result
      if (existing) {
        result = await node.services.identify.identify(await node.dial(target))
      } else {
        const { promise, resolve } = Promise.withResolvers()
        const onIdentify = (evt) => resolve(evt.detail)
        node.addEventListener('peer:identify', onIdentify)
        try {
          await node.dial(target)
          result = await Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error('no identify within 10 s')), 10000))])
        } finally {
          node.removeEventListener('peer:identify', onIdentify)
        }
      }
      return {
        agentVersion: result.agentVersion,
        protocolVersion: result.protocolVersion,
        protocols: result.protocols,
        listenAddrs: result.listenAddrs.map(String),
        observedAddr: result.observedAddr ? String(result.observedAddr) : null,
        peerId: result.peerId.toString()
      }
    }
    case 'echo':
    case 'sink': {
      const protocol = cmd.op === 'echo' ? ECHO : SINK
      const streams = cmd.streams ?? 1
      const per = Math.floor(cmd.bytes / streams)
      const start = process.hrtime.bigint()
      await Promise.all(Array.from({ length: streams }, (_, i) => oneStream(target, protocol, per, i)))
      const seconds = Number(process.hrtime.bigint() - start) / 1e9
      return { ok: true, seconds, bytes: per * streams }
    }
    case 'hangup': {
      for (const c of node.getConnections()) {
        if (c.remotePeer.toString() === target.toString().split('/p2p/')[1]) await c.close()
      }
      return { ok: true }
    }
    case 'connections':
      return { peers: node.getConnections().map(c => c.remotePeer.toString()) }
    default:
      throw new Error(`unknown op ${cmd.op}`)
  }
}

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let cmd
  try { cmd = JSON.parse(line) } catch { return }
  try {
    const result = await run(cmd)
    process.stdout.write(JSON.stringify({ id: cmd.id, ...result }) + '\n')
  } catch (err) {
    process.stdout.write(JSON.stringify({ id: cmd.id, error: String(err?.stack ?? err) }) + '\n')
  }
})
rl.on('close', async () => { await node.stop(); process.exit(0) })
process.on('SIGTERM', async () => { await node.stop(); process.exit(0) })

process.stdout.write(JSON.stringify({ peerId: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) }) + '\n')
