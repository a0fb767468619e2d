-- tokend's own tables and the SQL helpers the host app calls.

-- Encrypted secrets, one row per (tenant, name). App-wide secrets use the
-- nil uuid as tenant. The ciphertext is AES-256-GCM with additional data
-- binding it to its tenant and name, so a row copied elsewhere fails to open.
CREATE TABLE IF NOT EXISTS tokend_secrets (
    tenant uuid NOT NULL,
    name text NOT NULL,
    key_id text NOT NULL,
    nonce bytea NOT NULL,
    ciphertext bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- The events outbox: every event is also sent with NOTIFY; this table keeps
-- them for consumers that were not listening.
CREATE TABLE IF NOT EXISTS tokend_events (
    id bigserial PRIMARY KEY,
    type text NOT NULL,
    tenant uuid NOT NULL,
    integration_id uuid NOT NULL,
    provider text,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tokend_events_created_at ON tokend_events (created_at);

-- A 64-bit advisory lock key from a namespaced name (not 32-bit hashtext).
CREATE OR REPLACE FUNCTION tokend_lock_key(name text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || left(md5(name), 16))::bit(64)::bigint
$$;

-- The key of one integration's refresh lock. A host app that refreshes lazily
-- takes it in its own transaction to exclude tokend's refresh:
--   SELECT pg_advisory_xact_lock(tokend_integration_lock_key($1, $2));
CREATE OR REPLACE FUNCTION tokend_integration_lock_key(tenant uuid, integration_id uuid)
RETURNS bigint LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT tokend_lock_key('tokend.integration:' || tenant || ':' || integration_id)
$$;

-- Tell tokend about a change: event is connected, disconnected, refreshed,
-- reset, refresh_now or resync.
CREATE OR REPLACE FUNCTION tokend_notify(
    event text, tenant uuid, integration_id uuid, channel text DEFAULT 'tokend'
) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify(channel, json_build_object(
        'event', event, 'tenant', tenant, 'integration_id', integration_id
    )::text)
$$;

-- Trigger body for the host table: is_active turned on or off.
CREATE OR REPLACE FUNCTION tokend_notify_active_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.is_active IS DISTINCT FROM OLD.is_active THEN
        PERFORM tokend_notify(
            CASE WHEN NEW.is_active THEN 'connected' ELSE 'disconnected' END,
            NEW.tenant, NEW.integration_id,
            coalesce(TG_ARGV[0], 'tokend')
        );
    END IF;
    RETURN NEW;
END
$$;
