-- Notify tokend when the host app switches an integration on or off.
CREATE OR REPLACE TRIGGER tokend_active_change
    AFTER UPDATE OF is_active ON rmm_integrations
    FOR EACH ROW EXECUTE FUNCTION tokend_notify_active_change();
