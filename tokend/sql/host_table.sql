-- A table shaped like the host app's, for installations without a host app.
CREATE TABLE IF NOT EXISTS rmm_integrations (
    tenant uuid NOT NULL,
    integration_id uuid NOT NULL,
    provider text NOT NULL,
    instance_url text,
    is_active boolean NOT NULL DEFAULT true,
    settings jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, integration_id),
    UNIQUE (tenant, provider)
);
