-- A dispute's outcome is a state of its charge: `dispute_won` (the bank decided for the
-- provider: the money stays, the follower's stop is lifted) and `dispute_lost` (the money went
-- back to the cardholder: the stop stays). Both come after `disputed` in the charge's life and
-- before `refunded` (store.ChargeState), so events applied in any order still end in one state.
ALTER TABLE billing_charges DROP CONSTRAINT billing_charges_state_check;
ALTER TABLE billing_charges ADD CONSTRAINT billing_charges_state_check CHECK (state IN (
    'pending', 'requires_action', 'failed', 'succeeded', 'disputed', 'dispute_won',
    'dispute_lost', 'refunded'));

-- When the current pay-per-trade allowance was bought (UTC ns): the allowance counts the
-- copies opened since then. Whoever starts a purchase may say when (the scheduled purchases
-- do); a purchase that does not say (a Checkout session completing) is stamped with the
-- transaction's time.
ALTER TABLE billing_subscriptions ADD COLUMN ppt_purchased_ns bigint;

CREATE FUNCTION billing_ppt_purchase_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.ppt_purchase_id IS DISTINCT FROM OLD.ppt_purchase_id
       AND NEW.ppt_purchased_ns IS NOT DISTINCT FROM OLD.ppt_purchased_ns THEN
        NEW.ppt_purchased_ns := (extract(epoch FROM now()) * 1000000)::bigint * 1000;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER billing_ppt_purchase_stamp BEFORE UPDATE ON billing_subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing_ppt_purchase_stamp();
