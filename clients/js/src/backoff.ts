/** Reconnect delays: exponential backoff with full jitter. */
export interface BackoffOptions {
  /** The first delay's ceiling, ms (default 500). */
  baseMs?: number;
  /** The largest delay, ms (default 30,000). */
  maxMs?: number;
}

/**
 * Attempt n (0, 1, 2, …) waits a uniformly random time in [0, min(max, base · 2ⁿ)): clients
 * that lost the same node at the same moment spread their reconnections out instead of
 * arriving together.
 */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  const base = options.baseMs ?? 500;
  const max = options.maxMs ?? 30_000;
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
