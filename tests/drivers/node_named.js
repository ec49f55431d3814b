// node-postgres (pg) through pgwarden: named queries from a pg.Pool of several
// clients, concurrently, many times. pg parses a named query once per client
// connection and afterwards only binds it, so every later use may land on a server
// connection that has never seen it. Then errors in named queries (at execution and
// at parse) followed by more queries on the same client.
//
// usage: node node_named.js HOST PORT USER PASSWORD DBNAME
// Exits non-zero with a message on any wrong result or error; prints one summary line.

'use strict'

const pg = require('pg')

const WORKERS = 20
const ROUNDS = 100

function fail(message) {
  process.stderr.write(`node_named: FAILED: ${message}\n`)
  process.exit(1)
}

function check(ok, message) {
  if (!ok) throw new Error(message)
}

async function worker(pool, w, stats) {
  for (let i = 0; i < ROUNDS; i++) {
    const n = w * 1000 + i
    if (i % 10 === 9) {
      // Named queries inside a transaction on one client.
      const client = await pool.connect()
      try {
        await client.query('BEGIN')
        const a = await client.query({ name: 'q1', text: 'SELECT $1::int AS x', values: [n] })
        check(a.rows.length === 1 && a.rows[0].x === n, `worker ${w}: q1(${n}) in a transaction gave ${JSON.stringify(a.rows)}`)
        const b = await client.query({ name: 'q3', text: 'SELECT $1::int + $2::int AS sum', values: [n, w] })
        check(b.rows[0].sum === n + w, `worker ${w}: q3(${n}, ${w}) gave ${JSON.stringify(b.rows)}`)
        await client.query('COMMIT')
      } finally {
        client.release()
      }
      stats.transactions++
    } else if (i % 2 === 0) {
      const r = await pool.query({ name: 'q1', text: 'SELECT $1::int AS x', values: [n] })
      check(r.rows.length === 1 && r.rows[0].x === n, `worker ${w}: q1(${n}) gave ${JSON.stringify(r.rows)}`)
    } else {
      const s = `w${w}-${i}`
      const r = await pool.query({ name: 'q2', text: "SELECT $1::text || '!' AS s, $2::int AS n", values: [s, n] })
      check(r.rows.length === 1 && r.rows[0].s === s + '!' && r.rows[0].n === n, `worker ${w}: q2(${s}) gave ${JSON.stringify(r.rows)}`)
    }
    stats.queries++
  }
}

async function expectError(client, query, code, what) {
  try {
    const r = await client.query(query)
    throw new Error(`${what}: expected SQLSTATE ${code}, got rows ${JSON.stringify(r.rows)}`)
  } catch (e) {
    if (e.code !== code) {
      throw new Error(`${what}: expected SQLSTATE ${code}, got ${e.code || 'no code'}: ${e.message}`)
    }
  }
}

async function errors(pool, stats) {
  const client = await pool.connect()
  try {
    const div = (v) => ({ name: 'div', text: 'SELECT 10 / $1::int AS x', values: [v] })
    const q1 = (v) => ({ name: 'q1', text: 'SELECT $1::int AS x', values: [v] })
    let r = await client.query(div(2))
    check(r.rows[0].x === 5, `div(2) gave ${JSON.stringify(r.rows)}`)
    // An error while executing a named query, outside a transaction.
    await expectError(client, div(0), '22012', 'div(0)')
    r = await client.query(div(5))
    check(r.rows[0].x === 2, `div(5) after the error gave ${JSON.stringify(r.rows)}`)
    r = await client.query(q1(7))
    check(r.rows[0].x === 7, `q1(7) after the error gave ${JSON.stringify(r.rows)}`)
    // The same inside a transaction: the block fails until ROLLBACK.
    await client.query('BEGIN')
    r = await client.query(div(1))
    check(r.rows[0].x === 10, `div(1) in a transaction gave ${JSON.stringify(r.rows)}`)
    await expectError(client, div(0), '22012', 'div(0) in a transaction')
    await expectError(client, q1(1), '25P02', 'q1 in a failed transaction')
    await client.query('ROLLBACK')
    r = await client.query(div(10))
    check(r.rows[0].x === 1, `div(10) after ROLLBACK gave ${JSON.stringify(r.rows)}`)
    // A named query whose parse fails, twice; the client carries on.
    await expectError(client, { name: 'bad', text: 'SELEC 1' }, '42601', 'syntax error in a named query')
    r = await client.query(q1(8))
    check(r.rows[0].x === 8, `q1(8) after a failed parse gave ${JSON.stringify(r.rows)}`)
    await expectError(client, { name: 'bad', text: 'SELEC 1' }, '42601', 'the same syntax error again')
    // A new named query after all that.
    r = await client.query({ name: 'late', text: 'SELECT $1::text AS t', values: ['late'] })
    check(r.rows[0].t === 'late', `late query gave ${JSON.stringify(r.rows)}`)
    stats.errors += 5
  } finally {
    client.release()
  }
}

async function main() {
  if (process.argv.length !== 7) fail('usage: node node_named.js HOST PORT USER PASSWORD DBNAME')
  const [host, port, user, password, database] = process.argv.slice(2)
  const started = Date.now()
  const pool = new pg.Pool({ host, port: Number(port), user, password, database, max: 10 })
  // An error on an idle client is a failure too.
  pool.on('error', (e) => fail(`idle client error: ${e.message}`))
  const stats = { queries: 0, transactions: 0, errors: 0, servers: 0 }
  try {
    const workers = []
    for (let w = 0; w < WORKERS; w++) workers.push(worker(pool, w, stats))
    workers.push(errors(pool, stats))
    await Promise.all(workers)
    // Many server connections served the clients' named queries.
    const pids = new Set()
    await Promise.all(
      Array.from({ length: 40 }, async (_, i) => {
        const r = await pool.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS pid, $1::int AS i, pg_sleep(0.01)', values: [i] })
        check(r.rows[0].i === i, `pid query ${i} gave ${JSON.stringify(r.rows)}`)
        pids.add(r.rows[0].pid)
      }),
    )
    stats.servers = pids.size
    await pool.end()
  } catch (e) {
    fail(`${e.code ? `SQLSTATE ${e.code}: ` : ''}${e.message}`)
  }
  check(stats.queries === WORKERS * ROUNDS, `only ${stats.queries} queries`)
  const version = require('pg/package.json').version
  console.log(
    `node_named: ok pg ${version}: ${stats.queries} named queries from ${WORKERS} workers on 10 clients ` +
      `(${stats.transactions} transactions), ${stats.errors} error cases, ` +
      `${stats.servers} server connections seen, ${((Date.now() - started) / 1000).toFixed(1)}s`,
  )
}

main().catch((e) => fail(e.stack || String(e)))
