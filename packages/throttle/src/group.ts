import { type Clock, systemClock, type TimerHandle } from "./clock.ts";
import { ThrottleConfig } from "./config.ts";
import { ThrottleError } from "./errors.ts";
import { ThrottleState } from "./state.ts";

/** Options for {@link ThrottleGroup}. */
export interface ThrottleGroupOptions {
  /** The group's name (the `throttle-group` object id). */
  name: string;
  /** The shared limits (default: none). Validated. */
  config?: ThrottleConfig;
  /** Time source (default {@link systemClock}). */
  clock?: Clock;
}

/** A user of a {@link ThrottleGroup}: a throttle filter node or a BlockBackend with I/O limits. */
export interface ThrottleGroupMember {
  /** The group this member joined. */
  readonly group: ThrottleGroup;
  /** True once {@link ThrottleGroupMember.leave} was called. */
  readonly left: boolean;
  /**
   * Waits until a request of `bytes` bytes may be issued, then charges it to the group (accounting happens
   * at admission, before the caller issues the request). Requests of one member and direction are admitted
   * in FIFO order. Rejects with `EINVAL` for a negative or non-finite size or after `leave()`.
   */
  intercept(bytes: number, isWrite: boolean): Promise<void>;
  /** The number of requests of this direction waiting for admission. */
  queued(isWrite: boolean): number;
  /**
   * Lets this member's requests bypass the limits (QEMU does this while a member is drained): queued
   * requests are admitted at once and new ones are not delayed (they are still accounted). Nests; returns
   * a function that undoes this call (idempotent).
   */
  disableLimits(): () => void;
  /**
   * Leaves the group: passes the member's turn on to the next member.
   * @throws {ThrottleError} EBUSY when requests of this member are still queued (drain it first, e.g. with
   * `disableLimits()`).
   */
  leave(): void;
}

interface Waiter {
  readonly bytes: number;
  readonly resolve: () => void;
}

/** 0: reads, 1: writes. */
type Dir = 0 | 1;

class Member implements ThrottleGroupMember {
  readonly group: ThrottleGroup;
  left = false;
  /** Queued requests per direction (FIFO). QEMU's `pending_reqs` is their count. */
  readonly queues: [Waiter[], Waiter[]] = [[], []];
  /** Armed timer per direction. */
  readonly timers: [TimerHandle | undefined, TimerHandle | undefined] = [undefined, undefined];
  ioLimitsDisabled = 0;
  readonly #impl: GroupImpl;

  constructor(group: ThrottleGroup, impl: GroupImpl) {
    this.group = group;
    this.#impl = impl;
  }

  intercept(bytes: number, isWrite: boolean): Promise<void> {
    if (!(bytes >= 0) || !Number.isFinite(bytes)) {
      return Promise.reject(new ThrottleError("EINVAL", `invalid request size ${bytes}`));
    }
    if (this.left) {
      return Promise.reject(new ThrottleError("EINVAL", "this member has left its throttle group"));
    }
    return this.#impl.intercept(this, bytes, isWrite ? 1 : 0);
  }

  queued(isWrite: boolean): number {
    return this.queues[isWrite ? 1 : 0].length;
  }

  disableLimits(): () => void {
    this.ioLimitsDisabled++;
    if (this.ioLimitsDisabled === 1) this.#impl.restart(this);
    let undone = false;
    return () => {
      if (undone) return;
      undone = true;
      this.ioLimitsDisabled--;
    };
  }

  leave(): void {
    if (this.left) return;
    if (this.queues[0].length > 0 || this.queues[1].length > 0) {
      throw new ThrottleError(
        "EBUSY",
        `throttle group '${this.group.name}' member still has queued requests`,
      );
    }
    this.#impl.unregister(this);
    this.left = true;
  }
}

/** The group's scheduling machinery (kept off the public class). */
class GroupImpl {
  readonly state: ThrottleState;
  readonly clock: Clock;
  /** Members, newest first (QEMU inserts at the head). */
  readonly members: Member[] = [];
  /** Whose turn it is, per direction. */
  readonly tokens: [Member | undefined, Member | undefined] = [undefined, undefined];
  readonly anyTimerArmed: [boolean, boolean] = [false, false];

  constructor(config: ThrottleConfig, clock: Clock) {
    this.clock = clock;
    this.state = new ThrottleState(config, clock);
  }

  register(m: Member): void {
    if (this.tokens[0] === undefined) this.tokens[0] = m;
    if (this.tokens[1] === undefined) this.tokens[1] = m;
    this.members.unshift(m);
  }

  unregister(m: Member): void {
    for (const d of [0, 1] as const) {
      const t = m.timers[d];
      if (t !== undefined) {
        // Cannot happen with an empty queue; kept safe anyway.
        t.cancel();
        m.timers[d] = undefined;
        this.anyTimerArmed[d] = false;
      }
      if (this.tokens[d] === m) {
        const next = this.#next(m);
        this.tokens[d] = next === m ? undefined : next;
      }
    }
    this.members.splice(this.members.indexOf(m), 1);
  }

  intercept(m: Member, bytes: number, d: Dir): Promise<void> {
    if (m.ioLimitsDisabled > 0) {
      this.state.account(d === 1, bytes);
      return Promise.resolve();
    }
    const token = this.#nextToken(m, d);
    const mustWait = this.#scheduleTimer(token, d);
    if (mustWait || m.queues[d].length > 0) {
      return new Promise<void>((resolve) => m.queues[d].push({ bytes, resolve }));
    }
    this.state.account(d === 1, bytes);
    this.#scheduleNext(m, d);
    return Promise.resolve();
  }

  /** Fires pending timers now, otherwise admits the next queued request (QEMU's `throttle_group_restart_tgm`). */
  restart(m: Member): void {
    for (const d of [0, 1] as const) {
      const t = m.timers[d];
      if (t !== undefined) {
        t.cancel();
        this.#timerFired(m, d);
      } else {
        this.#admitOne(m, d);
        this.#scheduleNext(m, d);
      }
    }
  }

  /** The member after `m` in the circular list. */
  #next(m: Member): Member {
    const i = this.members.indexOf(m);
    return this.members[(i + 1) % this.members.length] ?? m;
  }

  /** Whose turn it is: the next member (round robin) with queued requests, else `m`. */
  #nextToken(m: Member, d: Dir): Member {
    if (m.queues[d].length > 0 && m.ioLimitsDisabled > 0) return m;
    const start = this.tokens[d] ?? m;
    let token = this.#next(start);
    while (token !== start && token.queues[d].length === 0) token = this.#next(token);
    if (token === start && start.queues[d].length === 0) token = m;
    return token;
  }

  /** True when `token` must wait; arms its timer when a wait is needed and no timer of `d` is armed. */
  #scheduleTimer(token: Member, d: Dir): boolean {
    if (token.ioLimitsDisabled > 0) return false;
    if (this.anyTimerArmed[d]) return true;
    const wait = this.state.computeWait(d === 1);
    if (wait <= 0) return false;
    if (token.timers[d] === undefined) this.#arm(token, d, wait);
    this.tokens[d] = token;
    this.anyTimerArmed[d] = true;
    return true;
  }

  #arm(m: Member, d: Dir, delayNs: number): void {
    const fire = (): void => {
      if (m.timers[d] !== handle) return;
      this.#timerFired(m, d);
    };
    let handle: TimerHandle;
    if (delayNs > 0) {
      handle = this.clock.setTimer(fire, delayNs);
    } else {
      // "Fire now": run after the current job, like a timer armed at the current time.
      let live = true;
      handle = {
        cancel: () => {
          live = false;
        },
      };
      queueMicrotask(() => {
        if (live) fire();
      });
    }
    m.timers[d] = handle;
  }

  #timerFired(m: Member, d: Dir): void {
    m.timers[d] = undefined;
    this.anyTimerArmed[d] = false;
    this.#admitOne(m, d);
    this.#scheduleNext(m, d);
  }

  /** Admits (accounts and wakes) the oldest queued request of `m` in direction `d`, if any. */
  #admitOne(m: Member, d: Dir): boolean {
    const w = m.queues[d].shift();
    if (w === undefined) return false;
    this.state.account(d === 1, w.bytes);
    w.resolve();
    return true;
  }

  /**
   * After a request of `m` was admitted: hands the turn to the next member with queued requests. If that
   * one needs no wait, `m`'s own next request is preferred (admitted now, and the loop continues as that
   * request would); otherwise the token's timer fires at once. If it must wait, its timer is armed.
   */
  #scheduleNext(m: Member, d: Dir): void {
    for (;;) {
      const token = this.#nextToken(m, d);
      if (token.queues[d].length === 0) return;
      if (this.#scheduleTimer(token, d)) return;
      if (m.queues[d].length > 0) {
        this.tokens[d] = m;
        this.#admitOne(m, d);
        continue;
      }
      this.#arm(token, d, 0);
      this.anyTimerArmed[d] = true;
      this.tokens[d] = token;
      return;
    }
  }
}

/**
 * A throttle group (QEMU's `throttle-group` object, `block/throttle-groups.c`): one {@link ThrottleState}
 * shared by all members, so the limits apply to the **sum** of their I/O.
 *
 * - Reads and writes are scheduled independently. At most **one timer per direction** is armed for the
 *   whole group.
 * - When the budget is spent, requests queue per member (FIFO) and admission passes **round robin** to the
 *   next member with queued requests, so a busy member cannot starve another.
 * - A request is accounted when it is admitted (on submission): one big request is never delayed by
 *   itself; the next one pays.
 * - {@link ThrottleGroup.setConfig} resets every level (QEMU's `throttle_config`) and restarts queued
 *   requests.
 * @example
 * const group = new ThrottleGroup({ name: "tg0", config: ThrottleConfig.fromLimits({ "bps-total": 1 << 20 }) });
 * const member = group.join();
 * await member.intercept(65536, false); // then issue the 64 KiB read
 * member.leave();
 */
export class ThrottleGroup {
  /** The group's name. */
  readonly name: string;
  readonly #g: GroupImpl;

  /** @throws {ThrottleError} EINVAL with QEMU's message when `config` is invalid. */
  constructor(opts: ThrottleGroupOptions) {
    this.name = opts.name;
    this.#g = new GroupImpl(opts.config ?? new ThrottleConfig(), opts.clock ?? systemClock);
  }

  /** Adds a member (a throttle filter node, a BlockBackend). */
  join(): ThrottleGroupMember {
    const impl = this.#g;
    const m = new Member(this, impl);
    impl.register(m);
    return m;
  }

  /** The number of members. */
  get size(): number {
    return this.#g.members.length;
  }

  /** The shared configuration. */
  get config(): ThrottleConfig {
    return this.#g.state.config;
  }

  /** The shared state (levels), for diagnostics. */
  get state(): ThrottleState {
    return this.#g.state;
  }

  /** The number of armed timers per direction ([reads, writes]); each is 0 or 1. */
  get armedTimers(): [number, number] {
    const impl = this.#g;
    let r = 0;
    let w = 0;
    for (const m of impl.members) {
      if (m.timers[0] !== undefined) r++;
      if (m.timers[1] !== undefined) w++;
    }
    return [r, w];
  }

  /**
   * Installs new limits for every member: validates, resets every bucket level (accumulated debt is
   * forgotten, even for an unchanged configuration), then restarts each member's queues (a pending timer
   * fires now, otherwise the next queued request is admitted).
   * @throws {ThrottleError} EINVAL with QEMU's message when `cfg` is invalid; nothing changes then.
   */
  setConfig(cfg: ThrottleConfig): void {
    const impl = this.#g;
    impl.state.setConfig(cfg);
    for (const m of [...impl.members]) impl.restart(m);
  }
}
