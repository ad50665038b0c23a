//+------------------------------------------------------------------+
//| TcMt5Events.mqh - MT5 trade transactions -> TradeEvent frames    |
//|                                                                  |
//| OnTradeTransaction (EAs only: services do not receive it) hands  |
//| every change of the account to CTcMt5Events::OnTransaction, which|
//| classifies it into the protocol's event kinds:                   |
//|   DEAL_ADD, DEAL_ENTRY_IN      -> opened, or pending_triggered   |
//|                                   when the deal's order was one  |
//|                                   of our known pending orders    |
//|   DEAL_ADD, DEAL_ENTRY_OUT     -> reduced / closed, decided by   |
//|                                   the position's volume before   |
//|                                   the deal (cached, see below)   |
//|   DEAL_ADD, DEAL_ENTRY_INOUT   -> closed + opened (netting flip) |
//|   DEAL_ADD, DEAL_ENTRY_OUT_BY  -> closed_by (one event for the   |
//|                                   pair of deals of one order;    |
//|                                   held back until the opposite   |
//|                                   position is known, see Poll)   |
//|   POSITION                     -> modified (SL/TP)               |
//|   ORDER_ADD / ORDER_UPDATE     -> pending_placed/pending_modified|
//|   ORDER_DELETE                 -> pending_cancelled (cancelled,  |
//|                                   expired, rejected); a filled   |
//|                                   order is reported by its deal  |
//|                                                                  |
//| Why a cache of volumes: OnTradeTransaction runs later than the   |
//| change it reports, so the live position may already be further  |
//| along (a partial close then a full close: when the first deal is |
//| handled the position is gone). Replaying deals on the volume the |
//| EA last knew keeps the classification in deal order. If the      |
//| terminal drops transactions (its queue is finite) the connector's|
//| state-hash comparison catches the difference and resyncs.        |
//+------------------------------------------------------------------+
#ifndef TC_MT5_EVENTS_MQH
#define TC_MT5_EVENTS_MQH

#include <Tradecopy\TcMt5Terminal.mqh>

#define TC_VOL_EPS 0.000000005
//--- close-by deals waiting for their opposite position (see OnEntryOutBy)
#define TC_CB_SLOTS 8
#define TC_CB_WAIT_MS 10000

class CTcMt5Events
  {
private:
   //--- positions as last known from transactions
   ulong             m_pTicket[];
   string            m_pSym[];
   int               m_pSide[];      // 0 buy, 1 sell
   double            m_pVol[];
   double            m_pSl[];
   double            m_pTp[];
   long              m_pMagic[];
   string            m_pComment[];
   int               m_pn;
   //--- pending orders as last known
   ulong             m_oTicket[];
   string            m_oSym[];
   long              m_oType[];
   double            m_oVol[];
   double            m_oPrice[];
   double            m_oSl[];
   double            m_oTp[];
   long              m_oExp[];       // UTC ns, 0 = none
   long              m_oMagic[];
   string            m_oComment[];
   int               m_on;
   //--- pending orders deleted as FILLED before their deal arrived (ring)
   ulong             m_fTicket[64];
   long              m_fType[64];
   int               m_fPos;
   //--- close-by orders already reported (ring): both deals of a close-by share one order
   ulong             m_cbOrder[64];
   int               m_cbPos;
   //--- close-by deals held back because their opposite position was not known yet:
   //--- a closed_by naming the opposite "0" would make followers refuse the close-by
   ulong             m_dOrder[TC_CB_SLOTS];
   ulong             m_dPos[TC_CB_SLOTS];
   int               m_dSide[TC_CB_SLOTS];
   double            m_dVol[TC_CB_SLOTS];
   double            m_dPrice[TC_CB_SLOTS];
   long              m_dMagic[TC_CB_SLOTS];
   string            m_dSym[TC_CB_SLOTS];
   long              m_dTime[TC_CB_SLOTS];
   ulong             m_dSince[TC_CB_SLOTS];   // TcNowMs() when held back; 0 = free slot
   //--- pending orders already reported as triggered (ring): partial fills add deals
   ulong             m_trig[64];
   int               m_trigPos;
   bool              m_warnedStopLimit;

   //--------------------------------------------------------------- rings
   bool              RingHas(const ulong &ring[], const ulong v) const
     {
      for(int i = 0; i < 64; i++)
         if(ring[i] == v)
            return true;
      return false;
     }

   //--------------------------------------------------------------- position cache
   int               PFind(const ulong t) const
     {
      for(int i = 0; i < m_pn; i++)
         if(m_pTicket[i] == t)
            return i;
      return -1;
     }
   int               PAdd(const ulong t)
     {
      if(m_pn >= ArraySize(m_pTicket))
        {
         int cap = MathMax(32, m_pn * 2);
         ArrayResize(m_pTicket, cap);
         ArrayResize(m_pSym, cap);
         ArrayResize(m_pSide, cap);
         ArrayResize(m_pVol, cap);
         ArrayResize(m_pSl, cap);
         ArrayResize(m_pTp, cap);
         ArrayResize(m_pMagic, cap);
         ArrayResize(m_pComment, cap);
        }
      int i = m_pn++;
      m_pTicket[i] = t;
      m_pSym[i] = "";
      m_pSide[i] = 0;
      m_pVol[i] = 0.0;
      m_pSl[i] = 0.0;
      m_pTp[i] = 0.0;
      m_pMagic[i] = 0;
      m_pComment[i] = "";
      return i;
     }
   void              PRemove(const int i)
     {
      int last = m_pn - 1;
      if(i < last)
        {
         m_pTicket[i] = m_pTicket[last];
         m_pSym[i] = m_pSym[last];
         m_pSide[i] = m_pSide[last];
         m_pVol[i] = m_pVol[last];
         m_pSl[i] = m_pSl[last];
         m_pTp[i] = m_pTp[last];
         m_pMagic[i] = m_pMagic[last];
         m_pComment[i] = m_pComment[last];
        }
      m_pn--;
     }
   //--- copy the selected position (PositionSelect*/PositionGetTicket done by the caller)
   void              PFillSelected(const int i)
     {
      m_pSym[i] = PositionGetString(POSITION_SYMBOL);
      m_pSide[i] = PositionGetInteger(POSITION_TYPE) == POSITION_TYPE_BUY ? 0 : 1;
      m_pVol[i] = PositionGetDouble(POSITION_VOLUME);
      m_pSl[i] = PositionGetDouble(POSITION_SL);
      m_pTp[i] = PositionGetDouble(POSITION_TP);
      m_pMagic[i] = PositionGetInteger(POSITION_MAGIC);
      m_pComment[i] = PositionGetString(POSITION_COMMENT);
     }

   //--------------------------------------------------------------- order cache
   int               OFind(const ulong t) const
     {
      for(int i = 0; i < m_on; i++)
         if(m_oTicket[i] == t)
            return i;
      return -1;
     }
   int               OAdd(const ulong t)
     {
      if(m_on >= ArraySize(m_oTicket))
        {
         int cap = MathMax(32, m_on * 2);
         ArrayResize(m_oTicket, cap);
         ArrayResize(m_oSym, cap);
         ArrayResize(m_oType, cap);
         ArrayResize(m_oVol, cap);
         ArrayResize(m_oPrice, cap);
         ArrayResize(m_oSl, cap);
         ArrayResize(m_oTp, cap);
         ArrayResize(m_oExp, cap);
         ArrayResize(m_oMagic, cap);
         ArrayResize(m_oComment, cap);
        }
      int i = m_on++;
      m_oTicket[i] = t;
      return i;
     }
   void              ORemove(const int i)
     {
      int last = m_on - 1;
      if(i < last)
        {
         m_oTicket[i] = m_oTicket[last];
         m_oSym[i] = m_oSym[last];
         m_oType[i] = m_oType[last];
         m_oVol[i] = m_oVol[last];
         m_oPrice[i] = m_oPrice[last];
         m_oSl[i] = m_oSl[last];
         m_oTp[i] = m_oTp[last];
         m_oExp[i] = m_oExp[last];
         m_oMagic[i] = m_oMagic[last];
         m_oComment[i] = m_oComment[last];
        }
      m_on--;
     }
   //--- copy the selected order (OrderSelect/OrderGetTicket done by the caller)
   void              OFillSelected(const int i)
     {
      m_oSym[i] = OrderGetString(ORDER_SYMBOL);
      m_oType[i] = OrderGetInteger(ORDER_TYPE);
      m_oVol[i] = OrderGetDouble(ORDER_VOLUME_CURRENT);
      m_oPrice[i] = OrderGetDouble(ORDER_PRICE_OPEN);
      m_oSl[i] = OrderGetDouble(ORDER_SL);
      m_oTp[i] = OrderGetDouble(ORDER_TP);
      long tt = OrderGetInteger(ORDER_TYPE_TIME);
      m_oExp[i] = (tt == ORDER_TIME_SPECIFIED || tt == ORDER_TIME_SPECIFIED_DAY)
                  ? TcServerToUtcNs((datetime)OrderGetInteger(ORDER_TIME_EXPIRATION)) : 0;
      m_oMagic[i] = OrderGetInteger(ORDER_MAGIC);
      m_oComment[i] = OrderGetString(ORDER_COMMENT);
     }

   //--------------------------------------------------------------- helpers
   static string     SideText(const int side) { return side == 0 ? "buy" : "sell"; }
   static bool       Differs(const double a, const double b) { return MathAbs(a - b) > TC_VOL_EPS; }

   static string     ReasonText(const long reason)
     {
      switch((int)reason)
        {
         case DEAL_REASON_SL:
            return "sl";
         case DEAL_REASON_TP:
            return "tp";
         case DEAL_REASON_SO:
            return "stop_out";
         case DEAL_REASON_EXPERT:
            return "expert";
        }
      return "client";   // client, mobile, web and everything the protocol has no word for
     }

   void              Emit(string &events[], const string tail)
     {
      int n = ArraySize(events);
      ArrayResize(events, n + 1);
      events[n] = tail;
     }

   void              OnEntryIn(int pi, const ulong pos, const ulong order, const long dtype, const double dvol,
                               const double dprice, const long magic, const string comment, const string sym,
                               const long time_ns, string &events[])
     {
      if(pi >= 0)
        {
         //--- an existing position grew: a netting account adding to its position, or a
         //--- second partial fill of one order. The protocol has no "increased" kind; the
         //--- state hash makes the connector resync from a snapshot.
         m_pVol[pi] += dvol;
         Print("tradecopy: position ", pos, " increased by ", dvol, " lots (no event kind for this; state hash will resync)");
         return;
        }
      //--- which pending order (if any) filled?
      long otype = -1;
      int oi = OFind(order);
      if(oi >= 0)
        {
         otype = m_oType[oi];
         ORemove(oi);
        }
      else
        {
         for(int k = 0; k < 64; k++)
            if(m_fTicket[k] == order && order != 0)
              {
               otype = m_fType[k];
               m_fTicket[k] = 0;
               break;
              }
         if(otype < 0 && order != 0 && HistoryOrderSelect(order))
           {
            long t = HistoryOrderGetInteger(order, ORDER_TYPE);
            if(TcMt5IsPending(t))
               otype = t;
           }
        }
      //--- cache the new position: live data when it still exists, else the deal's
      pi = PAdd(pos);
      if(PositionSelectByTicket(pos))
         PFillSelected(pi);
      else
        {
         m_pSym[pi] = sym;
         m_pSide[pi] = (dtype == DEAL_TYPE_BUY) ? 0 : 1;
         m_pMagic[pi] = magic;
         m_pComment[pi] = comment;
        }
      //--- replay in deal order: this deal brought the position to dvol
      m_pVol[pi] = dvol;
      string side = (dtype == DEAL_TYPE_BUY) ? "buy" : "sell";
      CTcJsonWriter w;
      if(otype >= 0 && !RingHas(m_trig, order))
        {
         m_trig[m_trigPos] = order;
         m_trigPos = (m_trigPos + 1) % 64;
         w.Str("kind", "pending_triggered");
         w.Str("ticket", IntegerToString((long)order));
         w.Str("symbol", sym);
         w.Str("side", side);
         w.Str("order_type", TcMt5OrderTypeText(otype));
         w.Num("volume", dvol);
         w.Num("price", dprice);
         w.Level("sl", m_pSl[pi]);
         w.Level("tp", m_pTp[pi]);
         w.IntOpt("magic", m_pMagic[pi]);
         w.StrOpt("comment", m_pComment[pi]);
         w.Str("position_ticket", IntegerToString((long)pos));
         w.IntOpt("time", time_ns);
        }
      else
        {
         w.Str("kind", "opened");
         w.Str("ticket", IntegerToString((long)pos));
         w.Str("symbol", sym);
         w.Str("side", side);
         w.Num("volume", dvol);
         w.Num("price", dprice);
         w.Level("sl", m_pSl[pi]);
         w.Level("tp", m_pTp[pi]);
         w.IntOpt("magic", m_pMagic[pi]);
         w.StrOpt("comment", m_pComment[pi]);
         w.IntOpt("time", time_ns);
        }
      Emit(events, w.Text());
     }

   void              OnEntryOut(const int pi, const ulong pos, const long dtype, const double dvol, const double dprice,
                                const long magic, const long reason, const string sym, const long time_ns, string &events[])
     {
      double before, after;
      if(pi >= 0)
         before = m_pVol[pi];
      else
         if(PositionSelectByTicket(pos))
            before = PositionGetDouble(POSITION_VOLUME) + dvol;   // unknown until now: best guess
         else
            before = dvol;
      after = before - dvol;
      if(after < TC_VOL_EPS)
         after = 0.0;
      //--- a closing deal is opposite to the position
      int side = (pi >= 0) ? m_pSide[pi] : (dtype == DEAL_TYPE_SELL ? 0 : 1);
      long pmagic = (pi >= 0) ? m_pMagic[pi] : magic;
      CTcJsonWriter w;
      if(after <= 0.0)
        {
         w.Str("kind", "closed");
         w.Str("ticket", IntegerToString((long)pos));
         w.Str("symbol", sym);
         w.Str("side", SideText(side));
         w.Num("volume", before);
         w.Num("price", dprice);
         w.IntOpt("magic", pmagic);
         w.Str("reason", ReasonText(reason));
         w.IntOpt("time", time_ns);
         if(pi >= 0)
            PRemove(pi);
        }
      else
        {
         w.Str("kind", "reduced");
         w.Str("ticket", IntegerToString((long)pos));
         w.Str("symbol", sym);
         w.Str("side", SideText(side));
         w.Num("volume", dvol);
         w.Num("volume_before", before);
         w.Num("volume_after", after);
         w.Num("price", dprice);
         w.IntOpt("magic", pmagic);
         w.Str("reason", ReasonText(reason));
         w.IntOpt("time", time_ns);
         if(pi >= 0)
            m_pVol[pi] = after;
        }
      Emit(events, w.Text());
     }

   //--- netting: one deal closed the position and opened the opposite one
   void              OnEntryInOut(const int pi, const ulong pos, const long dtype, const double dvol, const double dprice,
                                  const long magic, const long reason, const string sym, const long time_ns, string &events[])
     {
      double old_vol = (pi >= 0) ? m_pVol[pi] : 0.0;
      int old_side = (pi >= 0) ? m_pSide[pi] : (dtype == DEAL_TYPE_SELL ? 0 : 1);
      ulong new_ticket = pos;
      double new_vol = dvol - old_vol;
      if(PositionSelect(sym))
        {
         new_ticket = (ulong)PositionGetInteger(POSITION_TICKET);
         new_vol = PositionGetDouble(POSITION_VOLUME);
         if(pi < 0)
            old_vol = dvol - new_vol;
        }
      CTcJsonWriter c;
      c.Str("kind", "closed");
      c.Str("ticket", IntegerToString((long)pos));
      c.Str("symbol", sym);
      c.Str("side", SideText(old_side));
      c.Num("volume", old_vol);
      c.Num("price", dprice);
      c.IntOpt("magic", (pi >= 0) ? m_pMagic[pi] : magic);
      c.Str("reason", ReasonText(reason));
      c.IntOpt("time", time_ns);
      Emit(events, c.Text());
      if(pi >= 0)
         PRemove(pi);
      int ni = PAdd(new_ticket);
      if(PositionSelectByTicket(new_ticket))
         PFillSelected(ni);
      m_pSym[ni] = sym;
      m_pSide[ni] = (dtype == DEAL_TYPE_BUY) ? 0 : 1;
      m_pVol[ni] = new_vol;
      CTcJsonWriter o;
      o.Str("kind", "opened");
      o.Str("ticket", IntegerToString((long)new_ticket));
      o.Str("symbol", sym);
      o.Str("side", SideText(m_pSide[ni]));
      o.Num("volume", new_vol);
      o.Num("price", dprice);
      o.Level("sl", m_pSl[ni]);
      o.Level("tp", m_pTp[ni]);
      o.IntOpt("magic", magic);
      o.IntOpt("time", time_ns);
      Emit(events, o.Text());
     }

   //--- the position a close-by closed against `pos`, or 0 while nothing says it yet
   ulong             OppositeOf(const ulong pos, const ulong order, const ulong position_by)
     {
      if(position_by != 0 && position_by != pos)
         return position_by;
      //--- at DEAL_ADD time the close-by order may not be in history yet (then 0)
      if(order != 0 && HistoryOrderSelect(order))
        {
         ulong a = (ulong)HistoryOrderGetInteger(order, ORDER_POSITION_ID);
         ulong b = (ulong)HistoryOrderGetInteger(order, ORDER_POSITION_BY_ID);
         ulong opp = (a == pos) ? b : a;
         if(opp != 0 && opp != pos)
            return opp;
        }
      return 0;
     }

   void              EmitClosedBy(string &events[], const ulong pos, const ulong opp, const string sym,
                                  const int side, const double dvol, const double dprice, const long magic,
                                  const long time_ns)
     {
      CTcJsonWriter w;
      w.Str("kind", "closed_by");
      w.Str("ticket", IntegerToString((long)pos));
      w.Str("opposite_ticket", IntegerToString((long)opp));
      w.Str("symbol", sym);
      w.Str("side", SideText(side));
      w.Num("volume", dvol);
      w.Num("price", dprice);
      w.IntOpt("magic", magic);
      w.IntOpt("time", time_ns);
      Emit(events, w.Text());
     }

   int               DFind(const ulong order) const
     {
      for(int i = 0; i < TC_CB_SLOTS; i++)
         if(m_dSince[i] != 0 && m_dOrder[i] == order)
            return i;
      return -1;
     }

   //--- emit a held-back close-by now that its opposite is known, and free its slot
   void              EmitHeld(const int di, const ulong opp, string &events[])
     {
      EmitClosedBy(events, m_dPos[di], opp, m_dSym[di], m_dSide[di], m_dVol[di], m_dPrice[di],
                   m_dMagic[di], m_dTime[di]);
      m_dSince[di] = 0;
      m_dOrder[di] = 0;
     }

   //--- hold a close-by back until its opposite is known (the pair's second deal, or history)
   void              Hold(const ulong pos, const ulong order, const int side, const double dvol,
                          const double dprice, const long magic, const string sym, const long time_ns)
     {
      int free_slot = -1;
      if(order != 0)
         for(int i = 0; i < TC_CB_SLOTS && free_slot < 0; i++)
            if(m_dSince[i] == 0)
               free_slot = i;
      if(free_slot < 0)
        {
         //--- nothing can pair it later: say nothing rather than "0"; the connector's
         //--- state-hash check sees both positions gone and a snapshot settles them
         PrintFormat("tradecopy: close-by of position %I64d (order %I64d) not reported: its opposite position is unknown; "
                     "the next state-hash check resyncs", (long)pos, (long)order);
         return;
        }
      m_dOrder[free_slot] = order;
      m_dPos[free_slot] = pos;
      m_dSide[free_slot] = side;
      m_dVol[free_slot] = dvol;
      m_dPrice[free_slot] = dprice;
      m_dMagic[free_slot] = magic;
      m_dSym[free_slot] = sym;
      m_dTime[free_slot] = time_ns;
      ulong now = TcNowMs();
      m_dSince[free_slot] = (now == 0) ? 1 : now;   // 0 marks a free slot
     }

   //--- close-by: two OUT_BY deals (one per position) share the close-by order
   void              OnEntryOutBy(const int pi, const ulong pos, const ulong order, const ulong position_by, const long dtype,
                                  const double dvol, const double dprice, const long magic, const string sym,
                                  const long time_ns, string &events[])
     {
      bool reported = (order != 0 && RingHas(m_cbOrder, order));
      int side = (pi >= 0) ? m_pSide[pi] : (dtype == DEAL_TYPE_SELL ? 0 : 1);
      long pmagic = (pi >= 0) ? m_pMagic[pi] : magic;
      //--- each deal reduces its own position
      if(pi >= 0)
        {
         m_pVol[pi] -= dvol;
         if(m_pVol[pi] < TC_VOL_EPS)
            PRemove(pi);
        }
      if(reported)
        {
         //--- the pair's second deal: if the first was held back, this deal's position is
         //--- its opposite (the deal's own position data, no history needed)
         int di = DFind(order);
         if(di >= 0)
           {
            ulong held_opp = (pos != 0 && pos != m_dPos[di]) ? pos : OppositeOf(m_dPos[di], order, position_by);
            if(held_opp != 0 && held_opp != m_dPos[di])
               EmitHeld(di, held_opp, events);
           }
         return;
        }
      m_cbOrder[m_cbPos] = order;
      m_cbPos = (m_cbPos + 1) % 64;
      ulong opp = OppositeOf(pos, order, position_by);
      if(opp == 0)
        {
         Hold(pos, order, side, dvol, dprice, pmagic, sym, time_ns);
         return;
        }
      EmitClosedBy(events, pos, opp, sym, side, dvol, dprice, pmagic, time_ns);
     }

   //--------------------------------------------------------------- deals
   void              OnDeal(const MqlTradeTransaction &trans, string &events[])
     {
      ulong deal = trans.deal;
      if(deal == 0)
         return;
      long entry = -1;
      long dtype = (long)trans.deal_type;
      double dvol = trans.volume;
      double dprice = trans.price;
      ulong pos = trans.position;
      ulong order = trans.order;
      long reason = -1;
      long magic = 0;
      string comment = "";
      string sym = trans.symbol;
      long time_ns = TcUtcNowNs();
      if(HistoryDealSelect(deal))
        {
         entry = HistoryDealGetInteger(deal, DEAL_ENTRY);
         dtype = HistoryDealGetInteger(deal, DEAL_TYPE);
         dvol = HistoryDealGetDouble(deal, DEAL_VOLUME);
         dprice = HistoryDealGetDouble(deal, DEAL_PRICE);
         pos = (ulong)HistoryDealGetInteger(deal, DEAL_POSITION_ID);
         order = (ulong)HistoryDealGetInteger(deal, DEAL_ORDER);
         reason = HistoryDealGetInteger(deal, DEAL_REASON);
         magic = HistoryDealGetInteger(deal, DEAL_MAGIC);
         comment = HistoryDealGetString(deal, DEAL_COMMENT);
         sym = HistoryDealGetString(deal, DEAL_SYMBOL);
         time_ns = TcServerMscToUtcNs(HistoryDealGetInteger(deal, DEAL_TIME_MSC));
        }
      //--- balance, credit, commission, ... are not trades
      if(dtype != DEAL_TYPE_BUY && dtype != DEAL_TYPE_SELL)
         return;
      int pi = PFind(pos);
      if(entry < 0)
        {
         //--- history not readable (rare): infer the entry from what we know
         if(trans.position_by > 0)
            entry = DEAL_ENTRY_OUT_BY;
         else
            if(pi >= 0 && ((m_pSide[pi] == 0) == (dtype == DEAL_TYPE_SELL)))
               entry = DEAL_ENTRY_OUT;
            else
               entry = DEAL_ENTRY_IN;
        }
      if(entry == DEAL_ENTRY_IN)
         OnEntryIn(pi, pos, order, dtype, dvol, dprice, magic, comment, sym, time_ns, events);
      else
         if(entry == DEAL_ENTRY_OUT)
            OnEntryOut(pi, pos, dtype, dvol, dprice, magic, reason, sym, time_ns, events);
         else
            if(entry == DEAL_ENTRY_INOUT)
               OnEntryInOut(pi, pos, dtype, dvol, dprice, magic, reason, sym, time_ns, events);
            else
               if(entry == DEAL_ENTRY_OUT_BY)
                  OnEntryOutBy(pi, pos, order, trans.position_by, dtype, dvol, dprice, magic, sym, time_ns, events);
     }

   //--------------------------------------------------------------- positions (SL/TP)
   void              OnPosition(const MqlTradeTransaction &trans, string &events[])
     {
      ulong pos = trans.position;
      if(pos == 0)
         return;
      int pi = PFind(pos);
      double sl = trans.price_sl;
      double tp = trans.price_tp;
      if(pi < 0)
        {
         //--- not known (its opening was missed): learn it now and report the levels
         if(!PositionSelectByTicket(pos))
            return;
         pi = PAdd(pos);
         PFillSelected(pi);
        }
      else
        {
         if(!Differs(m_pSl[pi], sl) && !Differs(m_pTp[pi], tp))
           {
            //--- not an SL/TP change (a netting volume/price adjustment): keep the volume current
            if(trans.volume > 0.0)
               m_pVol[pi] = trans.volume;
            return;
           }
         m_pSl[pi] = sl;
         m_pTp[pi] = tp;
        }
      CTcJsonWriter w;
      w.Str("kind", "modified");
      w.Str("ticket", IntegerToString((long)pos));
      w.Str("symbol", m_pSym[pi]);
      w.Str("side", SideText(m_pSide[pi]));
      w.Level("sl", m_pSl[pi]);
      w.Level("tp", m_pTp[pi]);
      w.IntOpt("magic", m_pMagic[pi]);
      w.Int("time", TcUtcNowNs());
      Emit(events, w.Text());
     }

   //--------------------------------------------------------------- pending orders
   void              OnOrderUpsert(const MqlTradeTransaction &trans, string &events[])
     {
      long otype = (long)trans.order_type;
      if(!TcMt5IsPending(otype))
        {
         if((otype == ORDER_TYPE_BUY_STOP_LIMIT || otype == ORDER_TYPE_SELL_STOP_LIMIT) && !m_warnedStopLimit)
           {
            m_warnedStopLimit = true;
            Print("tradecopy: stop-limit orders are not part of the protocol and are not reported");
           }
         return;
        }
      //--- STARTED / REQUEST_* are transient states of a request in flight
      if(trans.order_state != ORDER_STATE_PLACED && trans.order_state != ORDER_STATE_PARTIAL)
         return;
      ulong t = trans.order;
      if(!OrderSelect(t))
         return;   // already gone again: its ORDER_DELETE / deal follows
      int oi = OFind(t);
      bool added = (oi < 0);
      double old_vol = 0, old_price = 0, old_sl = 0, old_tp = 0;
      long old_exp = 0;
      if(added)
         oi = OAdd(t);
      else
        {
         old_vol = m_oVol[oi];
         old_price = m_oPrice[oi];
         old_sl = m_oSl[oi];
         old_tp = m_oTp[oi];
         old_exp = m_oExp[oi];
        }
      OFillSelected(oi);
      if(!added && !Differs(old_vol, m_oVol[oi]) && !Differs(old_price, m_oPrice[oi]) &&
         !Differs(old_sl, m_oSl[oi]) && !Differs(old_tp, m_oTp[oi]) && old_exp == m_oExp[oi])
         return;   // an update that changed nothing we report
      CTcJsonWriter w;
      w.Str("kind", added ? "pending_placed" : "pending_modified");
      w.Str("ticket", IntegerToString((long)t));
      w.Str("symbol", m_oSym[oi]);
      w.Str("side", TcOrderTypeSide(TcOrderTypeFromText(TcMt5OrderTypeText(m_oType[oi]))));
      w.Str("order_type", TcMt5OrderTypeText(m_oType[oi]));
      w.Num("volume", m_oVol[oi]);
      w.Num("price", m_oPrice[oi]);
      w.Level("sl", m_oSl[oi]);
      w.Level("tp", m_oTp[oi]);
      w.IntOpt("expiration", m_oExp[oi]);
      w.IntOpt("magic", m_oMagic[oi]);
      if(added)
         w.StrOpt("comment", m_oComment[oi]);
      long setup = added ? TcServerMscToUtcNs(OrderGetInteger(ORDER_TIME_SETUP_MSC)) : 0;
      w.Int("time", setup > 0 ? setup : TcUtcNowNs());
      Emit(events, w.Text());
     }

   void              OnOrderDelete(const MqlTradeTransaction &trans, string &events[])
     {
      ulong t = trans.order;
      int oi = OFind(t);
      if(oi < 0)
         return;   // a market order, or a pending order we never knew
      long state = (long)trans.order_state;
      long done_ns = 0;
      if(HistoryOrderSelect(t))
        {
         state = HistoryOrderGetInteger(t, ORDER_STATE);
         done_ns = TcServerMscToUtcNs(HistoryOrderGetInteger(t, ORDER_TIME_DONE_MSC));
        }
      if(state == ORDER_STATE_FILLED || state == ORDER_STATE_PARTIAL)
        {
         //--- triggered: the deal reports it (pending_triggered); remember the type for it
         m_fTicket[m_fPos] = t;
         m_fType[m_fPos] = m_oType[oi];
         m_fPos = (m_fPos + 1) % 64;
         ORemove(oi);
         return;
        }
      string why = "cancelled";
      if(state == ORDER_STATE_EXPIRED)
         why = "expired";
      else
         if(state == ORDER_STATE_REJECTED)
            why = "rejected";
      CTcJsonWriter w;
      w.Str("kind", "pending_cancelled");
      w.Str("ticket", IntegerToString((long)t));
      w.Str("symbol", m_oSym[oi]);
      w.Str("side", TcOrderTypeSide(TcOrderTypeFromText(TcMt5OrderTypeText(m_oType[oi]))));
      w.Str("order_type", TcMt5OrderTypeText(m_oType[oi]));
      w.Num("volume", m_oVol[oi]);
      w.Num("price", m_oPrice[oi]);
      w.IntOpt("magic", m_oMagic[oi]);
      w.Str("reason", why);
      w.Int("time", done_ns > 0 ? done_ns : TcUtcNowNs());
      Emit(events, w.Text());
      ORemove(oi);
     }

public:
                     CTcMt5Events() : m_pn(0), m_on(0), m_fPos(0), m_cbPos(0), m_trigPos(0), m_warnedStopLimit(false)
     {
      for(int d = 0; d < TC_CB_SLOTS; d++)
        {
         m_dOrder[d] = 0;
         m_dSince[d] = 0;
        }
      for(int i = 0; i < 64; i++)
        {
         m_fTicket[i] = 0;
         m_fType[i] = 0;
         m_cbOrder[i] = 0;
         m_trig[i] = 0;
        }
     }

   //--- learn the account as it is now (no events: the snapshot describes it)
   void              Init()
     {
      m_pn = 0;
      m_on = 0;
      for(int p = 0; p < PositionsTotal(); p++)
        {
         ulong t = PositionGetTicket(p);
         if(t == 0)
            continue;
         PFillSelected(PAdd(t));
        }
      for(int o = 0; o < OrdersTotal(); o++)
        {
         ulong t = OrderGetTicket(o);
         if(t == 0 || !TcMt5IsPending(OrderGetInteger(ORDER_TYPE)))
            continue;
         OFillSelected(OAdd(t));
        }
     }

   //--- on every timer pass: close-by events held back for their opposite position, once
   //--- history names it; after TC_CB_WAIT_MS give up (never send "0") and let the
   //--- connector's state-hash check resync both positions from a snapshot
   void              Poll(string &events[])
     {
      for(int i = 0; i < TC_CB_SLOTS; i++)
        {
         if(m_dSince[i] == 0)
            continue;
         ulong opp = OppositeOf(m_dPos[i], m_dOrder[i], 0);
         if(opp != 0)
           {
            EmitHeld(i, opp, events);
            continue;
           }
         if(TcNowMs() - m_dSince[i] > TC_CB_WAIT_MS)
           {
            PrintFormat("tradecopy: close-by of position %I64d (order %I64d) not reported: the order did not reach history "
                        "within %d ms; the next state-hash check resyncs", (long)m_dPos[i], (long)m_dOrder[i], TC_CB_WAIT_MS);
            m_dSince[i] = 0;
            m_dOrder[i] = 0;
           }
        }
     }

   //--- classify one transaction; appends 0..2 event tails to events
   void              OnTransaction(const MqlTradeTransaction &trans, string &events[])
     {
      switch(trans.type)
        {
         case TRADE_TRANSACTION_DEAL_ADD:
            OnDeal(trans, events);
            break;
         case TRADE_TRANSACTION_POSITION:
            OnPosition(trans, events);
            break;
         case TRADE_TRANSACTION_ORDER_ADD:
         case TRADE_TRANSACTION_ORDER_UPDATE:
            OnOrderUpsert(trans, events);
            break;
         case TRADE_TRANSACTION_ORDER_DELETE:
            OnOrderDelete(trans, events);
            break;
         default:
            break;   // REQUEST, HISTORY_*, DEAL_UPDATE/DELETE: nothing a copier needs
        }
     }
  };

#endif // TC_MT5_EVENTS_MQH
//+------------------------------------------------------------------+
