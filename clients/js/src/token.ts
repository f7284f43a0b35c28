/** The token: asked of the application, renewed before it expires and when refused. */

/** The claims the client reads from a token (it never checks the signature). */
export interface TokenClaims {
  sub: string;
  exp: number;
}

/** Reads a JWT's payload (base64url JSON); null when it is not one. */
export function decodeToken(token: string): TokenClaims | null {
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof claims.sub !== 'string' || typeof claims.exp !== 'number') return null;
    return { sub: claims.sub, exp: claims.exp };
  } catch {
    return null;
  }
}

/** Holds the current token; asks `getToken` for a new one, once at a time. */
export class TokenKeeper {
  private token: string | null = null;
  private claims: TokenClaims | null = null;
  private pending: Promise<string> | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;

  constructor(
    private readonly getToken: () => Promise<string> | string,
    /** Renew this long before `exp`, ms. */
    private readonly marginMs: number,
    private readonly onError: (e: Error) => void,
  ) {}

  /** The user the token is for (known after the first token). */
  get userId(): string | null {
    return this.claims?.sub ?? null;
  }

  /** A token good for at least a few more seconds. */
  /** Starts (again) renewing before expiry. */
  start(): void {
    this.stopped = false;
  }

  async current(): Promise<string> {
    if (this.token && !this.expiresWithin(1_000)) return this.token;
    return this.renew();
  }

  /** When the current token expires (ms since the epoch; Infinity when unknown). */
  get expiresAt(): number {
    return this.claims ? this.claims.exp * 1000 : Number.POSITIVE_INFINITY;
  }

  /** True when the token expires within `ms` (or there is none). */
  expiresWithin(ms: number): boolean {
    if (!this.token) return true;
    if (!this.claims) return false;
    return this.claims.exp * 1000 - Date.now() <= ms;
  }

  /** Asks the application for a new token (one call for concurrent askers). */
  renew(): Promise<string> {
    if (this.pending) return this.pending;
    this.pending = (async () => {
      try {
        const token = await this.getToken();
        if (typeof token !== 'string' || token === '') throw new Error('getToken() gave no token');
        this.token = token;
        this.claims = decodeToken(token);
        this.schedule();
        return token;
      } finally {
        this.pending = null;
      }
    })();
    return this.pending;
  }

  /** Renews `marginMs` before expiry, so HTTP calls are never refused for an old token. */
  private schedule(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (!this.claims || this.stopped) return;
    const lifetime = this.claims.exp * 1000 - Date.now();
    const wait = Math.max(1_000, Math.min(lifetime - this.marginMs, lifetime * 0.8));
    if (wait > 2 ** 31 - 1) return;
    this.timer = setTimeout(() => {
      this.renew().catch((e) => this.onError(e instanceof Error ? e : new Error(String(e))));
    }, wait);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}
