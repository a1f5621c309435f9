import { expect, it } from "vitest";
import { BufferPool } from "../src/nbd/server/pool.ts";

it("reuses released buffers by size class", () => {
  const pool = new BufferPool();
  const a = pool.acquire(5000); // 8 KiB class
  expect(a.length).toBe(5000);
  pool.release(a);
  expect(pool.idleBytes).toBe(8192);
  const b = pool.acquire(8192);
  expect(b.buffer).toBe(a.buffer);
  expect(pool.idleBytes).toBe(0);
});

it("ignores double releases and foreign buffers", () => {
  const pool = new BufferPool();
  const a = pool.acquire(4096);
  pool.release(a);
  pool.release(a);
  expect(pool.idleBytes).toBe(4096);
  pool.release(Buffer.alloc(4096));
  expect(pool.idleBytes).toBe(4096);
  // The buffer handed out twice would be shared by two requests: it must come back once only.
  const x = pool.acquire(4096);
  const y = pool.acquire(4096);
  expect(x.buffer).not.toBe(y.buffer);
});

it("keeps at most maxIdleBytes idle and does not pool oversized buffers", () => {
  const pool = new BufferPool(16384);
  const bufs = [pool.acquire(8192), pool.acquire(8192), pool.acquire(8192)];
  for (const b of bufs) pool.release(b);
  expect(pool.idleBytes).toBe(16384);
  const big = pool.acquire(8 << 20);
  expect(big.length).toBe(8 << 20);
  pool.release(big);
  expect(pool.idleBytes).toBe(16384);
  pool.clear();
  expect(pool.idleBytes).toBe(0);
});
